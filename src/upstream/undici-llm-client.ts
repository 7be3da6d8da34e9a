import type { IncomingHttpHeaders } from 'node:http';
import { Pool, errors as undiciErrors } from 'undici';
import type { Dispatcher } from 'undici';
import { SseParser } from '../../libs/openai-contract/src/index.js';
import { abortFailure, describeUpstreamError, jsonResult, LlmClient, parseRetryAfter, type UpstreamCall, type UpstreamEvents, type UpstreamJsonResult, UpstreamFailure } from './llm-client.js';

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

  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    let response: Dispatcher.ResponseData;
    try {
      response = await this.pool.request({ ...this.dispatchOptions(call, true), signal: call.signal });
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    if (response.statusCode !== 200) {
      const text = await response.body.text().catch(() => '');
      throw httpFailure(response.statusCode, text, response.headers);
    }
    return relay(response.body, call.signal);
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

/** Collects one response: status, headers and the body as a string, or the error that ended it. */
class BufferingHandler implements Dispatcher.DispatchHandler {
  private statusCode = 0;
  private headers: IncomingHttpHeaders = {};
  private readonly chunks: Buffer[] = [];
  private controller: Dispatcher.DispatchController | undefined;
  private readonly onAbort = (): void => this.controller?.abort(this.signal.reason as Error);

  constructor(
    private readonly signal: AbortSignal,
    private readonly resolve: (response: BufferedResponse) => void,
    private readonly reject: (error: unknown) => void,
  ) {
    signal.addEventListener('abort', this.onAbort, { once: true });
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.controller = controller;
    if (this.signal.aborted) controller.abort(this.signal.reason as Error);
  }

  onResponseStart(_controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    // 1xx (100-continue, 103 early hints) come before the real answer.
    if (statusCode < 200) return;
    this.statusCode = statusCode;
    this.headers = headers;
  }

  onResponseData(_controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.chunks.push(chunk);
  }

  onResponseEnd(): void {
    this.signal.removeEventListener('abort', this.onAbort);
    const raw = this.chunks.length === 1 ? (this.chunks[0]).toString('utf8') : Buffer.concat(this.chunks).toString('utf8');
    this.resolve({ statusCode: this.statusCode, headers: this.headers, raw });
  }

  onResponseError(_controller: Dispatcher.DispatchController, error: Error): void {
    this.signal.removeEventListener('abort', this.onAbort);
    this.reject(error);
  }
}

async function* relay(body: Dispatcher.ResponseData['body'], signal: AbortSignal): AsyncGenerator<string> {
  const parser = new SseParser();
  const chunks = body[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let handedOff = false;
  try {
    for (let next = await chunks.next(); next.done !== true; next = await chunks.next()) {
      for (const data of parser.push(next.value)) {
        if (data === '[DONE]') {
          handedOff = true;
          drainAfterDone(chunks, body);
          return;
        }
        if (!looksLikeJsonObject(data)) throw new UpstreamFailure('bad_response', 'upstream sent a stream event that is not a JSON object');
        yield data;
      }
    }
  } catch (error) {
    throw streamFailure(error, signal);
  } finally {
    // Stop reading from the upstream when the consumer leaves early (client went away).
    if (!handedOff && !body.destroyed) body.destroy();
  }
  for (const data of parser.flush()) {
    if (data === '[DONE]') return;
    if (!looksLikeJsonObject(data)) throw new UpstreamFailure('bad_response', 'upstream sent a stream event that is not a JSON object');
    yield data;
  }
  if (signal.aborted) throw abortFailure(signal);
  throw new UpstreamFailure('cut', 'upstream stream ended before [DONE]');
}

/**
 * The cheap half of validating an event: it opens and closes like an object. That catches what
 * upstreams actually send broken (an event cut off, an HTML or text error page inside a 200
 * stream) for two character reads, where JSON.parse of every event would cost a parse per chunk
 * on the hot path; the events the pipeline reads anyway (model, usage) are parsed in full there.
 * Before the first event the failure is retried or falls back; after it, the client gets an SSE
 * error event.
 */
function looksLikeJsonObject(data: string): boolean {
  let start = 0;
  let end = data.length - 1;
  while (start <= end && isJsonSpace(data.charCodeAt(start))) start += 1;
  while (end >= start && isJsonSpace(data.charCodeAt(end))) end -= 1;
  return end > start && data.charCodeAt(start) === 123 /* { */ && data.charCodeAt(end) === 125; /* } */
}

function isJsonSpace(code: number): boolean {
  return code === 32 || code === 10 || code === 13 || code === 9;
}

/** Bytes an upstream may still send after [DONE] before the gateway stops reading. */
const MAX_BYTES_AFTER_DONE = 64 * 1024;

/**
 * After [DONE] the client's stream is over, but the upstream body usually has not emitted 'end'
 * yet (its terminator is in the same read). Leaving the loop there destroys an unfinished stream,
 * and Node builds and formats an AbortError stack on every such destroy: about a tenth of the
 * gateway's SSE CPU (BENCHMARKS.md). Reading on to the end costs nothing and keeps the keep-alive
 * connection reusable; it runs detached so the client never waits for it, and bodyTimeout still
 * bounds an upstream that holds the body open.
 */
function drainAfterDone(chunks: AsyncIterator<Buffer>, body: Dispatcher.ResponseData['body']): void {
  void (async () => {
    let extra = 0;
    try {
      for (let next = await chunks.next(); next.done !== true; next = await chunks.next()) {
        extra += next.value.length;
        if (extra > MAX_BYTES_AFTER_DONE) {
          body.destroy();
          return;
        }
      }
    } catch {
      // The client already has its [DONE]; a late upstream error changes nothing for it.
    }
  })();
}

function httpFailure(status: number, text: string, headers: IncomingHttpHeaders): UpstreamFailure {
  const { message, code } = describeUpstreamError(status, text);
  return new UpstreamFailure('http', message, status, parseRetryAfter(headers), code);
}

/** After the 200 the upstream was reachable: losing the connection now is the stream breaking off. */
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
