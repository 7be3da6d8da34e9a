import { type ChatCompletion, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { StreamAssembler } from '../cache/stream-replay.js';

/**
 * Reads what a stream produced: the usage when the upstream reports it, the model, and a content
 * count (the budget's estimate for a stream without usage). It reads each event from the parse the
 * driver made to check it (UpstreamEvents.parsed), never parsing it again. With `assemble` (the
 * cache will store the answer) every event also goes to a StreamAssembler, which keeps those parses
 * for the cache fill.
 */
export class StreamTracker {
  usage: Usage | undefined;
  model: string | undefined;
  contentBytes = 0;
  private assembler: StreamAssembler | undefined;

  constructor(assemble: boolean) {
    this.assembler = assemble ? new StreamAssembler() : undefined;
  }

  /**
   * `chunk` is the event's parse, read and kept (the assembler keeps the first as its answer's
   * head) but never changed: its other readers see the same object. Returns true when it is the
   * usage-only chunk (no choices).
   */
  observe(chunk: object): boolean {
    // Not replayable: from here on only what the budget and the log need is read.
    if (this.assembler !== undefined && !this.assembler.add(chunk)) this.assembler = undefined;
    const { model, choices } = chunk as { model?: unknown; choices?: unknown };
    if (typeof model === 'string') this.model = model;
    this.contentBytes += contentOf(choices);
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
}

function contentOf(choices: unknown): number {
  if (!Array.isArray(choices)) return 0;
  let n = 0;
  for (const choice of choices as unknown[]) {
    if (typeof choice !== 'object' || choice === null) continue;
    n += producedBytes((choice as { delta?: unknown }).delta);
  }
  return n;
}

/**
 * UTF-8 bytes of what a model produced in one message or delta, whichever field carries it:
 * `content`, `reasoning` (OpenRouter's; a thinking model's stream may be nothing else for a long
 * while), `reasoning_content` (DeepSeek's, vLLM's and other OpenAI-compatible servers'),
 * `refusal`, and the arguments of tool calls. What the budget estimates completion tokens from
 * when the upstream reports no usage (a cut stream; a JSON answer without usage), at the prompt
 * estimate's bytes ÷ 3: counted in UTF-16 units, CJK text (3 bytes, about a token, a character)
 * was charged a third of what it produced.
 */
export function producedBytes(part: unknown): number {
  if (typeof part !== 'object' || part === null) return 0;
  const {
    content,
    reasoning,
    reasoning_content: reasoningContent,
    refusal,
    tool_calls: toolCalls,
  } = part as { content?: unknown; reasoning?: unknown; reasoning_content?: unknown; refusal?: unknown; tool_calls?: unknown };
  let n = 0;
  if (typeof content === 'string') n += Buffer.byteLength(content);
  if (typeof reasoning === 'string') n += Buffer.byteLength(reasoning);
  if (typeof reasoningContent === 'string') n += Buffer.byteLength(reasoningContent);
  if (typeof refusal === 'string') n += Buffer.byteLength(refusal);
  if (Array.isArray(toolCalls)) {
    for (const call of toolCalls as unknown[]) {
      const args = (call as { function?: { arguments?: unknown } } | null)?.function?.arguments;
      if (typeof args === 'string') n += Buffer.byteLength(args);
    }
  }
  return n;
}
