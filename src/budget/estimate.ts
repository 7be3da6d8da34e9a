import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';

/**
 * Token estimates for reservations, deliberately on the high side: a reservation that is too
 * small lets a request overshoot its budget, one that is too large only refuses a request a
 * little early near the limit and is settled down to the real cost right after.
 *
 * English runs about 4 bytes per token and CJK about 3 bytes per character ≈ 1 token, so
 * bytes / 3 is above either. Every message carries a few tokens of framing; images are billed
 * by size, so each counts as a flat amount instead of the length of its (possibly base64) URL:
 * enough for most models (gpt-4o's largest image is 1,445 tokens, Claude's ~1,600), and where a
 * model's published per-image price is higher (gpt-4o-mini's largest is 48,169 tokens), the
 * budget's worst case takes that price instead (BudgetService.worstCase).
 */
export const BYTES_PER_TOKEN = 3;
export const TOKENS_PER_MESSAGE = 4;
export const TOKENS_PER_REQUEST = 3;
export const TOKENS_PER_IMAGE = 1500;

/** Body fields the upstream turns into prompt tokens. */
const PROMPT_FIELDS = ['messages', 'tools', 'functions', 'tool_choice', 'response_format'] as const;

export function estimatePromptTokens(body: ChatCompletionRequest): number {
  return estimatePrompt(body).tokens;
}

/** The prompt estimate, and how many images it counted (TOKENS_PER_IMAGE each, within `tokens`). */
export function estimatePrompt(body: ChatCompletionRequest): { tokens: number; images: number } {
  const tally = { bytes: 0, images: 0 };
  for (const field of PROMPT_FIELDS) walk(body[field], tally);
  const messages = Array.isArray(body.messages) ? body.messages.length : 0;
  const tokens = Math.ceil(tally.bytes / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * messages + TOKENS_PER_REQUEST + TOKENS_PER_IMAGE * tally.images;
  return { tokens, images: tally.images };
}

/** Completion tokens a request may produce: its cap, once per choice (`n`). */
export function reservedCompletionTokens(body: ChatCompletionRequest, maxTokens: number): number {
  const n = typeof body.n === 'number' && Number.isInteger(body.n) && body.n > 1 ? body.n : 1;
  return maxTokens * n;
}

/**
 * Tokens for text an upstream produced but never counted (a cut stream), from its UTF-8 bytes as
 * the prompt's are, on the same high side: above the real count, so the caller charges at most
 * the completion tokens it reserved for.
 */
export function producedTokens(bytes: number): number {
  return Math.ceil(Math.max(0, bytes) / BYTES_PER_TOKEN);
}

function walk(value: unknown, tally: { bytes: number; images: number }): void {
  if (typeof value === 'string') {
    tally.bytes += Buffer.byteLength(value);
  } else if (typeof value === 'number' || typeof value === 'boolean') {
    tally.bytes += 5;
  } else if (Array.isArray(value)) {
    for (const item of value) walk(item, tally);
  } else if (typeof value === 'object' && value !== null) {
    const type = (value as { type?: unknown }).type;
    if (type === 'image_url' || type === 'input_image' || type === 'image') {
      tally.images += 1;
      return;
    }
    for (const [key, item] of Object.entries(value)) {
      tally.bytes += key.length;
      walk(item, tally);
    }
  }
}
