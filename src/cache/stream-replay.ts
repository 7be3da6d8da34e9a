import { type ChatCompletion, type ChatCompletionChunk, isRecord } from '../../libs/openai-contract/src/index.js';

// Delta fields a cached stream may carry. Anything else (tool_calls, function_call, audio, …)
// makes the stream uncacheable rather than half-cached.
const TEXT_FIELDS = ['content', 'refusal', 'reasoning'] as const;

/**
 * Builds the chat.completion a finished stream amounts to, so a stream and a JSON request share
 * one cache entry. Returns undefined for anything that cannot be replayed faithfully (error
 * events, tool calls, logprobs, unparseable chunks, no finish_reason).
 */
export function assembleCompletion(payloads: readonly string[]): ChatCompletion | undefined {
  let head: Record<string, unknown> | undefined;
  let usage: unknown;
  const choices = new Map<number, { role: string; text: Partial<Record<(typeof TEXT_FIELDS)[number], string>>; finish: string | null }>();
  for (const payload of payloads) {
    let chunk: unknown;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return undefined;
    }
    if (!isRecord(chunk) || 'error' in chunk || !Array.isArray(chunk.choices)) return undefined;
    head ??= chunk;
    if (isRecord(chunk.usage)) usage = chunk.usage;
    for (const raw of chunk.choices as unknown[]) {
      if (!isRecord(raw) || typeof raw.index !== 'number') return undefined;
      if (raw.logprobs !== undefined && raw.logprobs !== null) return undefined;
      const choice = choices.get(raw.index) ?? { role: 'assistant', text: {}, finish: null };
      choices.set(raw.index, choice);
      const delta = raw.delta;
      if (delta !== undefined && delta !== null) {
        if (!isRecord(delta)) return undefined;
        for (const [field, value] of Object.entries(delta)) {
          if (value === null || value === undefined) continue;
          if (field === 'role') {
            if (typeof value !== 'string') return undefined;
            choice.role = value;
          } else if ((TEXT_FIELDS as readonly string[]).includes(field) && typeof value === 'string') {
            const f = field as (typeof TEXT_FIELDS)[number];
            choice.text[f] = (choice.text[f] ?? '') + value;
          } else if (!(Array.isArray(value) && value.length === 0)) {
            return undefined;
          }
        }
      }
      if (typeof raw.finish_reason === 'string') choice.finish = raw.finish_reason;
    }
  }
  if (head === undefined || choices.size === 0) return undefined;
  const extras: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(head)) if (!['object', 'choices', 'usage', 'id', 'created', 'model'].includes(k)) extras[k] = v;
  const completion: ChatCompletion = {
    ...extras,
    id: typeof head.id === 'string' ? head.id : 'chatcmpl-cached',
    object: 'chat.completion',
    created: typeof head.created === 'number' ? head.created : 0,
    model: typeof head.model === 'string' ? head.model : '',
    choices: [...choices.entries()]
      .sort(([a], [b]) => a - b)
      .map(([index, c]) => ({
        index,
        message: {
          role: c.role,
          content: c.text.content ?? null,
          ...(c.text.refusal !== undefined ? { refusal: c.text.refusal } : {}),
          ...(c.text.reasoning !== undefined ? { reasoning: c.text.reasoning } : {}),
        },
        finish_reason: c.finish,
        logprobs: null,
      })),
  };
  if (completion.choices.some((c) => c.finish_reason === null)) return undefined;
  if (usage !== undefined) completion.usage = usage as ChatCompletion['usage'];
  return completion;
}

/**
 * The SSE payloads that replay a cached completion the way OpenAI streams one: a role chunk,
 * the text, a finish chunk, then (only if the client asked) the usage chunk.
 */
export function replayChunks(completion: ChatCompletion, includeUsage: boolean): string[] {
  const base = { id: completion.id, object: 'chat.completion.chunk' as const, created: completion.created, model: completion.model };
  const extra: Record<string, unknown> = {};
  if (completion.system_fingerprint !== undefined) extra.system_fingerprint = completion.system_fingerprint;
  const out: string[] = [];
  const chunk = (choices: ChatCompletionChunk['choices'], usage?: unknown) =>
    out.push(JSON.stringify({ ...base, ...extra, choices, ...(usage === undefined ? {} : { usage }) }));
  for (const choice of completion.choices) {
    chunk([{ index: choice.index, delta: { role: choice.message.role, content: '' }, finish_reason: null }]);
    const delta: Record<string, unknown> = {};
    for (const [field, value] of Object.entries(choice.message)) {
      if (field !== 'role' && value !== null && value !== undefined) delta[field] = value;
    }
    if (Object.keys(delta).length > 0) chunk([{ index: choice.index, delta, finish_reason: null }]);
    chunk([{ index: choice.index, delta: {}, finish_reason: choice.finish_reason }]);
  }
  if (includeUsage && completion.usage) chunk([], completion.usage);
  return out;
}
