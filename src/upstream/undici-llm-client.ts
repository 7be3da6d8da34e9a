import type { IncomingHttpHeaders } from 'node:http';
import { Pool, errors as undiciErrors } from 'undici';
import type { Dispatcher } from 'undici';
import { SseParser } from '../../libs/openai-contract/src/index.js';
import {
  abortFailure,
  describeUpstreamError,
  DriverEvents,
  failureOf,
  jsonResult,
  LlmClient,
  MAX_BYTES_AFTER_DONE,
  MAX_ERROR_BODY_BYTES,
  MAX_UPSTREAM_BODY_BYTES,
  namedErrorEventFailure,
  checkStreamEvent,
  parseRetryAfter,
  type UpstreamCall,
  type UpstreamEvents,
  type UpstreamJsonResult,
  UpstreamFailure,
  withholdUpstreamKey,
} from './llm-client.js';

export interface UndiciClientOptions {
  baseUrl: string;
  apiKey: string;
  timeoutMs: number;
  connections: number;
  extraHeaders: Record<string, string>;
}

/**
 * The default upstream driver: one keep-alive undici Pool per upstream origin, the body sent as
 * one string, the response read once. SSE is relayed event by event as bytes arrive.
 */
export class UndiciLlmClient extends LlmClient {
  private readonly pool: Pool;
  private readonly path: string;
  private readonly headers: Record<string, string>;

  constructor(private readonly options: UndiciClientOptions) {
    super();
    const url = new URL(options.baseUrl);
    this.pool = new Pool(url.origin, { connections: options.connections, keepAliveTimeout: 30_000, pipelining: 1 });
    this.path = `${url.pathname.replace(/\/+$/, '')}/chat/completions`;
    this.headers = { 'content-type': 'application/json', authorization: `Bearer ${options.apiKey}`, ...options.extraHeaders };
    withholdUpstreamKey(options.apiKey);
  }

  private dispatchOptions(call: UpstreamCall, stream: boolean): Dispatcher.DispatchOptions {
    return {
      method: 'POST',
      path: this.path,
      headers: { ...this.headers, 'x-request-id': call.requestId, accept: stream ? 'text/event-stream' : 'application/json' },
      body: JSON.stringify(call.body),
      headersTimeout: this.options.timeoutMs,
      bodyTimeout: this.options.timeoutMs,
    };
  }

  /**
   * A JSON answer is read whole: through `dispatch` with a handler that keeps the chunks, rather
   * than `request()`, whose per-call Readable body stream, async-resource scope and text()
   * consumer were the largest part of what undici cost a cache miss (BENCHMARKS.md, session 4).
   */
  async complete(call: UpstreamCall): Promise<UpstreamJsonResult> {
    let response: BufferedResponse;
    try {
      response = await new Promise<BufferedResponse>((resolve, reject) => {
        if (call.signal.aborted) {
          reject(call.signal.reason as Error);
          return;
        }
        this.pool.dispatch(this.dispatchOptions(call, false), new BufferingHandler(call.signal, resolve, reject));
      });
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    if (response.statusCode !== 200) throw httpFailure(response.statusCode, response.raw, response.headers);
    return jsonResult(response.raw);
  }

  /** Resolves at the response head; the events are parsed and handed on as the bytes arrive. */
  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    if (call.signal.aborted) throw abortFailure(call.signal);
    const relay = new SseRelay(call.signal);
    this.pool.dispatch(this.dispatchOptions(call, true), relay);
    let statusCode: number;
    try {
      statusCode = await relay.head;
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    if (statusCode !== 200) {
      // A body that cannot be read still leaves the status to report, unless the deadline (or the
      // caller leaving) is what stopped it: that is reported as on the JSON path.
      const text = await relay.text().catch((error: unknown) => {
        if (call.signal.aborted) throw toFailure(error, call.signal);
        return '';
      });
      throw httpFailure(statusCode, text, relay.headers);
    }
    return new DriverEvents((events) => relay.events(events));
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}

interface BufferedResponse {
  statusCode: number;
  headers: IncomingHttpHeaders;
  raw: string;
}

/**
 * What both handlers share: the caller's signal aborts the request (also before it started),
 * and the final status and headers are kept (1xx such as 100-continue or 103 come first and
 * are skipped). `detach()` once the response is over.
 */
abstract class SignalledHandler implements Dispatcher.DispatchHandler {
  statusCode = 0;
  headers: IncomingHttpHeaders = {};
  protected controller: Dispatcher.DispatchController | undefined;
  private readonly onAbort = (): void => {
    if (this.controller) this.controller.abort(this.signal.reason as Error);
    // Still queued for a pool connection (every one busy): undici starts the request only when one
    // frees up, which may be much later, so the waiting caller is failed now (the deadline, or the
    // client gone) and onRequestStart aborts the request if it is ever dispatched.
    else this.abortedWhileQueued(this.signal.reason as Error);
  };

  constructor(protected readonly signal: AbortSignal) {
    signal.addEventListener('abort', this.onAbort, { once: true });
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.controller = controller;
    if (this.signal.aborted) controller.abort(this.signal.reason as Error);
  }

  onResponseStart(_controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    if (statusCode < 200) return;
    this.statusCode = statusCode;
    this.headers = headers;
    this.started();
  }

  /** The final status and headers are in. */
  protected started(): void {}

  /** The signal fired before undici started the request: fail whoever waits for it. */
  protected abstract abortedWhileQueued(reason: Error): void;

  protected detach(): void {
    this.signal.removeEventListener('abort', this.onAbort);
  }
}

/** Collects one response: status, headers and the body as a string, or the error that ended it. */
class BufferingHandler extends SignalledHandler {
  private readonly chunks: Buffer[] = [];
  private bytes = 0;

  constructor(
    signal: AbortSignal,
    private readonly resolve: (response: BufferedResponse) => void,
    private readonly reject: (error: unknown) => void,
  ) {
    super(signal);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.bytes += chunk.length;
    if (this.bytes > MAX_UPSTREAM_BODY_BYTES) {
      // A refusal's body past its start says nothing more; an answer this large is no answer.
      if (this.statusCode === 200) controller.abort(tooLarge('answer'));
      return;
    }
    if (this.statusCode !== 200 && this.bytes > MAX_ERROR_BODY_BYTES) return;
    this.chunks.push(chunk);
  }

  onResponseEnd(): void {
    this.detach();
    const raw = this.chunks.length === 1 ? (this.chunks[0]).toString('utf8') : Buffer.concat(this.chunks).toString('utf8');
    this.resolve({ statusCode: this.statusCode, headers: this.headers, raw });
  }

  onResponseError(_controller: Dispatcher.DispatchController, error: Error): void {
    this.detach();
    this.reject(error);
  }

  protected abortedWhileQueued(reason: Error): void {
    this.reject(reason);
  }
}

/** Events parsed but not yet taken by the consumer beyond which the upstream is paused. */
const MAX_QUEUED_EVENTS = 256;

/**
 * One streamed response through `dispatch`: the head resolves `head`; a 200's body goes through
 * the SSE parser as it arrives and its events are queued for `events()`, the consumer's pace
 * (pause/resume past MAX_QUEUED_EVENTS); any other status's body is kept for the error. Why not
 * `request()`: its Readable body and async iteration cost more than the parsing (see complete()).
 */
class SseRelay extends SignalledHandler {
  readonly head: Promise<number>;
  private resolveHead!: (statusCode: number) => void;
  private rejectHead!: (error: unknown) => void;
  private readonly parser = new SseParser();
  /** Event payloads, or the failure an `event: error` frame reported, in the order they came. */
  private readonly queue: Array<string | UpstreamFailure> = [];
  private readonly errorBody: Buffer[] = [];
  private errorBytes = 0;
  private ended = false;
  private error: Error | undefined;
  /** The consumer has its [DONE] (or left): later bytes are counted, not parsed. */
  private finished = false;
  private bytesAfterDone = 0;
  private wake: (() => void) | undefined;

  constructor(signal: AbortSignal) {
    super(signal);
    this.head = new Promise<number>((resolve, reject) => {
      this.resolveHead = resolve;
      this.rejectHead = reject;
    });
    // Handled here: a head that failed is awaited by stream(), and a later error by events().
    this.head.catch(() => undefined);
  }

  protected override started(): void {
    this.resolveHead(this.statusCode);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (this.statusCode !== 200) {
      // Only its start is read for the error; the rest is drained with the connection.
      this.errorBytes += chunk.length;
      if (this.errorBytes <= MAX_ERROR_BODY_BYTES) this.errorBody.push(chunk);
      return;
    }
    if (this.finished) {
      // After [DONE]: read on to the end (destroying an unfinished body builds an AbortError and
      // its stack, and loses the keep-alive connection), but not forever.
      this.bytesAfterDone += chunk.length;
      if (this.bytesAfterDone > MAX_BYTES_AFTER_DONE) controller.abort(new Error('upstream kept sending after [DONE]'));
      return;
    }
    const events = this.parser.push(chunk);
    // An event over the limit, still arriving or just completed: never relayed.
    if (this.parser.unfinishedLength > MAX_UPSTREAM_BODY_BYTES || anyLonger(events, MAX_UPSTREAM_BODY_BYTES)) {
      controller.abort(tooLarge('stream event'));
      return;
    }
    this.enqueue(events);
    if (this.queue.length > MAX_QUEUED_EVENTS) controller.pause();
    this.notify();
  }

  onResponseEnd(): void {
    this.detach();
    this.ended = true;
    if (!this.finished && this.statusCode === 200) this.enqueue(this.parser.flush());
    this.notify();
  }

  onResponseError(_controller: Dispatcher.DispatchController, error: Error): void {
    this.detach();
    this.error = error;
    this.rejectHead(error);
    this.notify();
  }

  protected abortedWhileQueued(reason: Error): void {
    this.error = reason;
    this.rejectHead(reason);
    this.notify();
  }

  private enqueue(events: string[]): void {
    const names = this.parser.names;
    if (names === undefined) for (const data of events) this.queue.push(data);
    else for (let i = 0; i < events.length; i++) this.queue.push(names[i] === 'error' ? namedErrorEventFailure(events[i]) : events[i]);
  }

  /** The body of a refused request (for the error it names). */
  async text(): Promise<string> {
    while (!this.ended && !this.error) await new Promise<void>((resolve) => (this.wake = resolve));
    if (this.error) throw this.error;
    return Buffer.concat(this.errorBody).toString('utf8');
  }

  /** Yields each payload through `out`, which keeps its parse for the readers (UpstreamEvents.parsed). */
  async *events(out: DriverEvents): AsyncGenerator<string> {
    let first = true;
    try {
      for (;;) {
        while (this.queue.length > 0) {
          const data = this.queue.shift() as string | UpstreamFailure;
          // An `event: error` frame: as an error event below.
          if (typeof data !== 'string') throw data;
          if (data === '[DONE]') {
            this.finished = true;
            this.queue.length = 0;
            // Paused with [DONE] among a burst of queued events: read the rest (the chunked end) now,
            // or the request never ends and its pool connection is never given back (undici's body
            // timeout does not run while paused).
            if (this.controller?.paused) this.controller.resume();
            return;
          }
          const event = checkStreamEvent(data, first);
          first = false;
          yield out.yielding(data, event);
          if (this.queue.length === 0 && this.controller?.paused) this.controller.resume();
        }
        if (this.error) throw streamFailure(this.error, this.signal);
        if (this.ended) break;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      // The consumer left before the end (the client went away, or a bad event): stop reading.
      if (!this.finished && !this.ended && !this.error) {
        this.finished = true;
        this.controller?.abort(new Error('the gateway stopped reading this stream'));
      }
    }
    if (this.signal.aborted) throw abortFailure(this.signal);
    throw new UpstreamFailure('cut', 'upstream stream ended before [DONE]');
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

function httpFailure(status: number, text: string, headers: IncomingHttpHeaders): UpstreamFailure {
  return failureOf(describeUpstreamError(status, text), status, parseRetryAfter(headers));
}

/** After the 200 the upstream was reachable: losing the connection now is the stream breaking off. */
function anyLonger(events: string[], max: number): boolean {
  for (let i = 0; i < events.length; i++) if (events[i].length > max) return true;
  return false;
}

function tooLarge(what: string): UpstreamFailure {
  return new UpstreamFailure('bad_response', `upstream ${what} over ${MAX_UPSTREAM_BODY_BYTES / (1024 * 1024)} MiB`);
}

function streamFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  const failure = toFailure(error, signal);
  return failure.kind === 'connection' ? new UpstreamFailure('cut', `upstream stream broke off: ${(error as Error).message}`) : failure;
}

function toFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  if (signal.aborted) return abortFailure(signal);
  if (error instanceof undiciErrors.HeadersTimeoutError || error instanceof undiciErrors.BodyTimeoutError) {
    return new UpstreamFailure('timeout', 'upstream did not answer in time');
  }
  return new UpstreamFailure('connection', `upstream connection failed: ${(error as Error).message}`);
}
