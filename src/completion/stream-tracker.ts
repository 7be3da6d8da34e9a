import { type ChatCompletion, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { StreamAssembler } from '../cache/stream-replay.js';

/**
 * Events of a non-cacheable stream kept unparsed, for a content count nobody may ask for: beyond
 * this many characters they are counted and dropped, so a long stream holds little.
 */
const PENDING_MAX_CHARS = 64 * 1024;

/**
 * Reads what a stream produced, parsing each event at most once: the usage when the upstream
 * reports it, the model, and a content count (the budget's estimate for a stream without usage).
 *
 * An event the driver parsed already (both drivers parse every one to check it) is read from that
 * parse, never parsed again; this is how a streamed miss runs. Otherwise: with `assemble` (the
 * cache will store the answer) every event is parsed once and handed to a StreamAssembler, so the
 * cache fill reuses the parse. Without it (or once the stream turned out not to be replayable)
 * only the events that must be read are parsed: those that may carry a non-null `usage`, and the
 * first ones until one names the model; the rest are counted lazily, which a stream that reports
 * its usage never needs.
 */
export class StreamTracker {
  usage: Usage | undefined;
  model: string | undefined;
  private assembler: StreamAssembler | undefined;
  private chars = 0;
  private pending: string[] = [];
  private pendingChars = 0;

  constructor(assemble: boolean) {
    this.assembler = assemble ? new StreamAssembler() : undefined;
  }

  /** Characters produced (content, reasoning, refusal, tool-call arguments) over every choice of every event. */
  get contentChars(): number {
    if (this.pending.length > 0) this.countPending();
    return this.chars;
  }

  /**
   * Returns true when the payload is the usage-only chunk (no choices). `parsed`: the payload's
   * parse when the driver made one (UpstreamEvents.parsed), read and kept (the assembler keeps the
   * first as its answer's head) but never changed: its other readers see the same object.
   */
  observe(payload: string, parsed?: object): boolean {
    const assembler = this.assembler;
    let chunk: unknown = parsed;
    if (chunk === undefined) {
      if (assembler === undefined && this.model !== undefined && !mayCarryUsage(payload)) {
        this.pending.push(payload);
        this.pendingChars += payload.length;
        if (this.pendingChars > PENDING_MAX_CHARS) this.countPending();
        return false;
      }
      try {
        chunk = JSON.parse(payload);
      } catch {
        this.stopAssembling();
        return false;
      }
    }
    if (assembler !== undefined && !assembler.add(chunk)) this.stopAssembling();
    if (typeof chunk !== 'object' || chunk === null) return false;
    const { model, choices } = chunk as { model?: unknown; choices?: unknown };
    if (typeof model === 'string') this.model = model;
    this.chars += contentOf(choices);
    const usage = (chunk as { usage?: unknown }).usage ? readUsage(chunk) : undefined;
    if (usage) this.usage = usage;
    return usage !== undefined && Array.isArray(choices) && choices.length === 0;
  }

  /**
   * The chat.completion the finished stream amounts to, for the cache; undefined when the
   * tracker was not assembling or the stream cannot be replayed (see StreamAssembler).
   */
  completion(): ChatCompletion | undefined {
    return this.assembler?.result();
  }

  private stopAssembling(): void {
    // Not replayable: from here on only what the budget and the log need is read.
    this.assembler = undefined;
  }

  private countPending(): void {
    for (const payload of this.pending) {
      try {
        this.chars += contentOf((JSON.parse(payload) as { choices?: unknown } | null)?.choices);
      } catch {
        // Not JSON: no content, as when it was observed.
      }
    }
    this.pending = [];
    this.pendingChars = 0;
  }
}

function contentOf(choices: unknown): number {
  if (!Array.isArray(choices)) return 0;
  let n = 0;
  for (const choice of choices as unknown[]) {
    if (typeof choice !== 'object' || choice === null) continue;
    n += producedChars((choice as { delta?: unknown }).delta);
  }
  return n;
}

/**
 * Characters a model produced in one message or delta, whichever field carries them: `content`,
 * `reasoning` (a thinking model's stream may be nothing else for a long while), `refusal`, and
 * the arguments of tool calls. What the budget estimates completion tokens from when the upstream
 * reports no usage (a cut stream; a JSON answer without usage).
 */
export function producedChars(part: unknown): number {
  if (typeof part !== 'object' || part === null) return 0;
  const { content, reasoning, refusal, tool_calls: toolCalls } = part as { content?: unknown; reasoning?: unknown; refusal?: unknown; tool_calls?: unknown };
  let n = 0;
  if (typeof content === 'string') n += content.length;
  if (typeof reasoning === 'string') n += reasoning.length;
  if (typeof refusal === 'string') n += refusal.length;
  if (Array.isArray(toolCalls)) {
    for (const call of toolCalls as unknown[]) {
      const args = (call as { function?: { arguments?: unknown } } | null)?.function?.arguments;
      if (typeof args === 'string') n += args.length;
    }
  }
  return n;
}

/**
 * false only when the payload cannot have a top-level `usage` that is not null: every `"usage"`
 * in it is either not a key or a key set to null (OpenRouter sends `"usage":null` in every chunk).
 * Inside a JSON string a quote is always escaped, so `"usage"` followed by `:` is a key; a key
 * spelled with escapes (`"\u0075sage"`) would be missed, and no upstream writes one. A true only
 * means "parse it".
 */
export function mayCarryUsage(payload: string): boolean {
  // Searched without its opening quote: JSON is full of quotes, and a needle that starts with
  // one made this scan cost a quarter of a JSON.parse.
  for (let i = payload.indexOf('usage"'); i !== -1; i = payload.indexOf('usage"', i + 6)) {
    if (payload.charCodeAt(i - 1) !== 34 /* " */) continue;
    let j = skipSpace(payload, i + 6);
    if (payload.charCodeAt(j) !== 58 /* : */) continue;
    j = skipSpace(payload, j + 1);
    if (!payload.startsWith('null', j)) return true;
  }
  return false;
}

function skipSpace(text: string, at: number): number {
  let i = at;
  for (;;) {
    const c = text.charCodeAt(i);
    if (c !== 32 && c !== 9 && c !== 10 && c !== 13) return i;
    i++;
  }
}
