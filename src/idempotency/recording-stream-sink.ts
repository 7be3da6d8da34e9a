import type { CompletionMeta, PacedStreamSink } from '../completion/completion.types.js';
import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';
import { reportsFailure } from '../upstream/llm-client.js';

/**
 * The most of a stream's events kept to replay it: past this many characters of payloads the
 * stream is not stored (its key is released, as for a failed call), so one very long stream
 * cannot hold an unbounded copy in memory and in the database. A JSON answer of the same length
 * in tokens is ~30x smaller: each event repeats the id, model and created of the stream.
 */
export const MAX_RECORDED_CHARS = 8 * 1024 * 1024;

/** A stream that completed, as it was sent: its metadata and the payloads of its events. */
export interface RecordedStream {
  meta: CompletionMeta;
  events: string[];
}

/**
 * Passes a stream through to the client's sink and keeps what it sent, so a stream with an
 * idempotency-key can be stored once it completed and replayed exactly as it went out. The
 * pipeline's `close` (the `[DONE]`) is held back until `end()`: the answer is stored before the
 * client sees its end, so a client that repeats the call as soon as it has the whole stream gets
 * the replay, not a 409. Pacing (back-pressure) is the client sink's own.
 */
export class RecordingStreamSink implements PacedStreamSink {
  private meta: CompletionMeta | undefined;
  private events: string[] | undefined = [];
  private chars = 0;
  private failed = false;
  private ended = false;

  constructor(
    private readonly sink: PacedStreamSink,
    private readonly maxChars = MAX_RECORDED_CHARS,
  ) {}

  get closed(): boolean {
    return this.sink.closed;
  }

  get backedUp(): boolean {
    return this.sink.backedUp;
  }

  drained(signal: AbortSignal): Promise<void> {
    return this.sink.drained(signal);
  }

  open(meta: CompletionMeta): void {
    this.meta = meta;
    this.sink.open(meta);
  }

  event(payload: string): void {
    if (this.events !== undefined) {
      if (reportsError(payload)) this.failed = true;
      this.chars += payload.length;
      if (this.chars > this.maxChars) this.events = undefined;
      else this.events.push(payload);
    }
    this.sink.event(payload);
  }

  /** The pipeline ended the stream (completed, or failed in-band); the client's sink is closed by `end()`. */
  close(): void {
    this.ended = true;
  }

  /**
   * The stream to store: only one that the pipeline ended without an error event, that reached
   * the client whole (it did not leave) and that was not too long to keep; undefined otherwise.
   */
  recorded(): RecordedStream | undefined {
    if (!this.ended || this.failed || this.events === undefined || this.meta === undefined || this.sink.closed) return undefined;
    return { meta: this.meta, events: this.events };
  }

  /** Sends the `[DONE]` the pipeline's close held back; nothing when the pipeline never closed the stream. */
  end(): void {
    if (this.ended) this.sink.close();
  }
}

/**
 * Whether an event reports a failure: the pipeline's in-band error (`{"error":…}`), or an upstream
 * chunk with an `error` or a choice that finished with `"error"` (OpenRouter's mid-stream error).
 * Only events that spell `"error"` somewhere are parsed.
 */
function reportsError(payload: string): boolean {
  if (!payload.includes('"error"')) return false;
  let chunk: unknown;
  try {
    chunk = JSON.parse(payload);
  } catch {
    return true;
  }
  if (typeof chunk !== 'object' || chunk === null) return true;
  // As the cache refuses a JSON answer (`"error": null`, which some upstreams put in every chunk, is none).
  return reportsFailure(chunk as ChatCompletion);
}
