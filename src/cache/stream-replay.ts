import { type ChatCompletion, type ChatCompletionChunk, isRecord } from '../../libs/openai-contract/src/index.js';

// Delta fields a cached stream may carry. Anything else (tool_calls, function_call, audio, …)
// makes the stream uncacheable rather than half-cached.
type TextField = 'content' | 'refusal' | 'reasoning';

// Keys of the first chunk that the completion sets itself rather than copying.
const OWN_KEYS = new Set(['object', 'choices', 'usage', 'id', 'created', 'model']);

/** The token logprobs of a choice, as a JSON answer carries them: each list whole, in order. */
interface Logprobs {
  content: unknown[] | null;
  refusal: unknown[] | null;
}

interface ChoiceState {
  role: string;
  content: string | undefined;
  refusal: string | undefined;
  reasoning: string | undefined;
  finish: string | null;
  logprobs: Logprobs | undefined;
}

/**
 * Builds, chunk by chunk, the chat.completion a finished stream amounts to, so a stream and a
 * JSON request share one cache entry. Fed the chunks the pipeline already parsed (StreamTracker),
 * so no event is parsed twice. A stream's logprobs are per chunk, for the tokens of that chunk:
 * joined in order they are the JSON answer's lists. Once a chunk cannot be replayed faithfully
 * (error events, tool calls, logprobs of an unknown shape, unparseable chunks) the stream is
 * refused for good and later chunks are ignored.
 */
export class StreamAssembler {
  private head: Record<string, unknown> | undefined;
  private usage: unknown;
  private readonly choices = new Map<number, ChoiceState>();
  private refused = false;

  /** false once the stream cannot be replayed; feeding it more is then pointless. */
  get replayable(): boolean {
    return !this.refused;
  }

  /** An event that is not JSON: such a stream is never cached. */
  refuse(): void {
    this.refused = true;
  }

  /** Takes one parsed chunk; returns `replayable`. */
  add(chunk: unknown): boolean {
    if (this.refused) return false;
    // A chunk that reports a failure (as reportsFailure reads a JSON answer): an error, or a choice
    // finished as "error" (below). `"error": null`, which some providers put in every chunk, is none.
    if (!isRecord(chunk) || (chunk.error !== undefined && chunk.error !== null) || !Array.isArray(chunk.choices)) return this.fail();
    this.head ??= chunk;
    if (isRecord(chunk.usage)) this.usage = chunk.usage;
    for (const raw of chunk.choices as unknown[]) {
      if (!isRecord(raw) || typeof raw.index !== 'number') return this.fail();
      let choice = this.choices.get(raw.index);
      if (choice === undefined) {
        choice = { role: 'assistant', content: undefined, refusal: undefined, reasoning: undefined, finish: null, logprobs: undefined };
        this.choices.set(raw.index, choice);
      }
      if (raw.logprobs !== undefined && raw.logprobs !== null && !addLogprobs(choice, raw.logprobs)) return this.fail();
      const delta = raw.delta;
      if (delta !== undefined && delta !== null) {
        if (!isRecord(delta)) return this.fail();
        for (const field of Object.keys(delta)) {
          const value = delta[field];
          if (value === null || value === undefined) continue;
          if (field === 'role') {
            if (typeof value !== 'string') return this.fail();
            choice.role = value;
          } else if (typeof value === 'string' && (field === 'content' || field === 'refusal' || field === 'reasoning')) {
            const f: TextField = field;
            choice[f] = (choice[f] ?? '') + value;
          } else if (!(Array.isArray(value) && value.length === 0)) {
            return this.fail();
          }
        }
      }
      if (typeof raw.finish_reason === 'string') {
        if (raw.finish_reason === 'error') return this.fail();
        choice.finish = raw.finish_reason;
      }
    }
    return true;
  }

  /** The completion, or undefined when the stream cannot be replayed or did not finish every choice. */
  result(): ChatCompletion | undefined {
    const head = this.head;
    if (this.refused || head === undefined || this.choices.size === 0) return undefined;
    const extras: Record<string, unknown> = {};
    for (const k of Object.keys(head)) if (!OWN_KEYS.has(k)) extras[k] = head[k];
    const indices = [...this.choices.keys()].sort((a, b) => a - b);
    const choices: ChatCompletion['choices'] = [];
    for (const index of indices) {
      const c = this.choices.get(index) as ChoiceState;
      if (c.finish === null) return undefined;
      const message: ChatCompletion['choices'][number]['message'] = { role: c.role, content: c.content ?? null };
      if (c.refusal !== undefined) message.refusal = c.refusal;
      if (c.reasoning !== undefined) message.reasoning = c.reasoning;
      choices.push({ index, message, finish_reason: c.finish, logprobs: c.logprobs ?? null });
    }
    const completion: ChatCompletion = {
      ...extras,
      id: typeof head.id === 'string' ? head.id : 'chatcmpl-cached',
      object: 'chat.completion',
      created: typeof head.created === 'number' ? head.created : 0,
      model: typeof head.model === 'string' ? head.model : '',
      choices,
    };
    if (this.usage !== undefined) completion.usage = this.usage as ChatCompletion['usage'];
    return completion;
  }

  private fail(): false {
    this.refused = true;
    return false;
  }
}

/** Appends a chunk's logprobs to its choice's; false for a shape that cannot be joined faithfully. */
function addLogprobs(choice: ChoiceState, logprobs: unknown): boolean {
  if (!isRecord(logprobs)) return false;
  for (const field of Object.keys(logprobs)) {
    if (field !== 'content' && field !== 'refusal') return false;
    const tokens = logprobs[field];
    if (tokens === null || tokens === undefined) continue;
    if (!Array.isArray(tokens)) return false;
    choice.logprobs ??= { content: null, refusal: null };
    const into = (choice.logprobs[field] ??= []);
    // One by one: a spread of a very long list would exceed the argument limit.
    for (const token of tokens as unknown[]) into.push(token);
  }
  return true;
}

/** {@link StreamAssembler} over SSE payloads not parsed yet (tests, and callers without a tracker). */
export function assembleCompletion(payloads: readonly string[]): ChatCompletion | undefined {
  const assembler = new StreamAssembler();
  for (const payload of payloads) {
    let chunk: unknown;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return undefined;
    }
    if (!assembler.add(chunk)) return undefined;
  }
  return assembler.result();
}

/**
 * The SSE payloads that replay a cached completion the way OpenAI streams one: a role chunk,
 * the text, a finish chunk, then (only if the client asked) the usage chunk. The text chunk
 * carries the choice's logprobs: OpenAI puts on each chunk the logprobs of the tokens it holds,
 * and this one holds them all (a hit that dropped them answered less than the miss did).
 */
export function replayChunks(completion: ChatCompletion, includeUsage: boolean): string[] {
  const base = { id: completion.id, object: 'chat.completion.chunk' as const, created: completion.created, model: completion.model };
  const extra: Record<string, unknown> = {};
  if (completion.system_fingerprint !== undefined) extra.system_fingerprint = completion.system_fingerprint;
  const out: string[] = [];
  const chunk = (choices: Array<ChatCompletionChunk['choices'][number] & { logprobs?: unknown }>, usage?: unknown) =>
    out.push(JSON.stringify({ ...base, ...extra, choices, ...(usage === undefined ? {} : { usage }) }));
  for (const choice of completion.choices) {
    chunk([{ index: choice.index, delta: { role: choice.message.role, content: '' }, finish_reason: null }]);
    const delta: Record<string, unknown> = {};
    for (const [field, value] of Object.entries(choice.message)) {
      if (field !== 'role' && value !== null && value !== undefined) delta[field] = value;
    }
    const logprobs = choice.logprobs;
    if (logprobs !== undefined && logprobs !== null) chunk([{ index: choice.index, delta, finish_reason: null, logprobs }]);
    else if (Object.keys(delta).length > 0) chunk([{ index: choice.index, delta, finish_reason: null }]);
    chunk([{ index: choice.index, delta: {}, finish_reason: choice.finish_reason }]);
  }
  if (includeUsage && completion.usage) chunk([], completion.usage);
  return out;
}
