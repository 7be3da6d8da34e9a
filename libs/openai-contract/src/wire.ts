import { parseUsd } from '../../money/src/index.js';

/**
 * The slice of the OpenAI Chat Completions wire format that the gateway reads. Everything else
 * in a body is passed through untouched, so clients may send parameters this file never heard of.
 */
export interface ChatMessage {
  role: string;
  content?: unknown;
  [key: string]: unknown;
}

export interface ChatCompletionRequest {
  model?: string;
  messages: ChatMessage[];
  stream?: boolean;
  max_tokens?: number;
  max_completion_tokens?: number;
  stream_options?: { include_usage?: boolean; [key: string]: unknown };
  [key: string]: unknown;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** OpenRouter reports the charged cost in USD (a decimal string is kept as sent, see cleanUsage). */
  cost?: number | string;
  [key: string]: unknown;
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: Array<{
    index: number;
    message: { role: string; content: string | null; [key: string]: unknown };
    finish_reason: string | null;
    [key: string]: unknown;
  }>;
  usage?: Usage;
  [key: string]: unknown;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: Array<{ index: number; delta: { role?: string; content?: string | null; [key: string]: unknown }; finish_reason: string | null }>;
  usage?: Usage | null;
  [key: string]: unknown;
}

export interface ErrorBody {
  message: string;
  type: string;
  code: string | null;
  param: string | null;
  [key: string]: unknown;
}

export interface ErrorEnvelope {
  error: ErrorBody;
}

export function errorEnvelope(message: string, type: string, code: string | null, param: string | null = null): ErrorEnvelope {
  return { error: { message, type, code, param } };
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * A token count as the gateway can use it: a whole, non-negative number. The upstream's JSON is
 * not trusted to be one: a fractional count rounds, and a negative or non-finite one (`1e400`
 * parses as Infinity) is no count at all. Money is computed from these with `BigInt`, which
 * throws on a fraction, and the ledger refuses a negative cost.
 */
export function readTokenCount(value: unknown): number | undefined {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) return undefined;
  return Math.round(value);
}

/**
 * Reads `usage` from a parsed completion or chunk, or undefined when absent or malformed (a
 * prompt or completion count that is not a number, is negative or non-finite): the budget then
 * charges an answer as it does one without usage, by its estimate.
 */
export function readUsage(value: unknown): Usage | undefined {
  return isRecord(value) ? cleanUsage(value.usage) : undefined;
}

/** A `usage` object itself (one already taken out of its completion), read as readUsage reads it. */
export function cleanUsage(usage: unknown): Usage | undefined {
  if (!isRecord(usage)) return undefined;
  const prompt = readTokenCount(usage.prompt_tokens);
  const completion = readTokenCount(usage.completion_tokens);
  if (prompt === undefined || completion === undefined) return undefined;
  const total = readTokenCount(usage.total_tokens) ?? prompt + completion;
  const out: Usage = { ...usage, prompt_tokens: prompt, completion_tokens: completion, total_tokens: total };
  // A cost sent as text is kept as the text, priced exactly later, when it is a decimal amount:
  // Number() would read '' and '  ' as 0 (a free call) and '0x1F' as 31. Anything else is no cost,
  // and the price table decides.
  const cost = usage.cost;
  if (typeof cost !== 'number' && (typeof cost !== 'string' || parseUsd(cost) === undefined)) delete out.cost;
  return out;
}
