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
  /** OpenRouter reports the charged cost in USD. */
  cost?: number;
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

/** Reads `usage` from a parsed completion or chunk, or undefined when absent or malformed. */
export function readUsage(value: unknown): Usage | undefined {
  if (!isRecord(value)) return undefined;
  const usage = value.usage;
  if (!isRecord(usage)) return undefined;
  const prompt = usage.prompt_tokens;
  const completion = usage.completion_tokens;
  if (typeof prompt !== 'number' || typeof completion !== 'number') return undefined;
  const total = typeof usage.total_tokens === 'number' ? usage.total_tokens : prompt + completion;
  const out: Usage = { ...usage, prompt_tokens: prompt, completion_tokens: completion, total_tokens: total };
  if (typeof usage.cost !== 'number' && typeof usage.cost !== 'string') delete out.cost;
  else out.cost = Number(usage.cost);
  return out;
}
