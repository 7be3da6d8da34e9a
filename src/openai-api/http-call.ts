import type { FastifyReply, FastifyRequest } from 'fastify';
import type { CompletionCall, CompletionMeta, Door, PacedStreamSink, StreamSink } from '../completion/completion.types.js';
import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import { formatUsd } from '../../libs/money/src/index.js';
import { routeHeader } from '../routing/routing-table.js';
import { MAX_CACHE_TTL_SECONDS } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { type IdempotentDoor, parseIdempotencyKey, submissionHash } from '../idempotency/idempotency-key.js';
import { type IdempotencyClaim, type IdempotencyService, storedRoute } from '../idempotency/idempotency.service.js';
import type { StoredResponse } from '../idempotency/idempotency.types.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The completion call this request became, once its body was valid (see AuditHttpHook). */
    completionCall?: CompletionCall;
  }
}

const TTL_SECONDS = /^\d{1,8}$/;
const LINE_BREAKS = /[\r\n]/g;

/** Builds the pipeline's view of an HTTP request: principal, abort signal, cache directives. */
export function callFromRequest(request: FastifyRequest, reply: FastifyReply, body: ChatCompletionRequest, taskType: string | undefined, door: Door): CompletionCall {
  const principal = request.principal;
  if (!principal) throw new Error('completion route without authentication');
  const controller = new AbortController();
  // 'close' on the response fires on completion too; only an unfinished response means the client left.
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  // Already gone (it hung up while its key was looked up on a slow database): 'close' has fired,
  // and the call would otherwise be answered upstream, and charged, for nobody.
  if (reply.raw.destroyed) controller.abort();
  const cacheControl = String(request.headers['cache-control'] ?? '').toLowerCase();
  const ttlHeader = request.headers['x-gateway-cache-ttl'];
  let ttlSeconds: number | undefined;
  if (ttlHeader !== undefined) {
    // Digits only: Number() reads an empty header as 0, which silently stored nothing, and takes
    // '1e3', '0x10' and '5.0' as whole numbers too.
    ttlSeconds = typeof ttlHeader === 'string' && TTL_SECONDS.test(ttlHeader) ? Number(ttlHeader) : Number.NaN;
    if (!(ttlSeconds <= MAX_CACHE_TTL_SECONDS)) {
      throw new GatewayError('invalid_value', `'x-gateway-cache-ttl' must be a whole number of seconds from 0 to ${MAX_CACHE_TTL_SECONDS}.`, {
        param: 'x-gateway-cache-ttl',
      });
    }
  }
  const call: CompletionCall = {
    principal,
    requestId: request.id,
    body,
    taskType,
    door,
    signal: controller.signal,
    abort: (reason) => controller.abort(reason),
    cacheControl: { read: !cacheControl.includes('no-cache'), write: !cacheControl.includes('no-store'), ttlSeconds },
    admission: request.admission,
  };
  // The audit hook reads `audited` from it: the pipeline records what it answers or refuses.
  request.completionCall = call;
  return call;
}

/**
 * Runs a `@DeferredAdmission()` door. Any error it throws (a 400 before the pipeline ran, say)
 * is rendered only after the admission verdict is in: a caller over its limit gets the 429, and
 * every answer carries the rate-limit headers, exactly as if the guard had awaited the check.
 */
export async function admitted(request: FastifyRequest, work: () => Promise<void>): Promise<void> {
  try {
    await work();
  } catch (error) {
    await request.admission;
    throw error;
  }
}

/** Whether a sync call carries an `idempotency-key`: one header read, all that calls without one pay. */
export function hasIdempotencyKey(request: FastifyRequest): boolean {
  return request.headers['idempotency-key'] !== undefined;
}

/**
 * A sync call with an `idempotency-key` (API.md "Decisions"): the key is claimed for this call and
 * `answer` runs, storing what it sends through the claim (see `sendJsonOnce`, `streamOnce`); or
 * the stored answer of an earlier call is replayed (`x-gateway-cost-usd: 0`, `idempotent-replayed:
 * true`), with no upstream call and no charge; or 409 while that call still runs, 422 for another
 * body under the key. Whatever `answer` throws frees the key first, so the client's retry runs.
 */
export async function answerIdempotently(
  idempotency: IdempotencyService,
  request: FastifyRequest,
  reply: FastifyReply,
  call: CompletionCall,
  door: IdempotentDoor,
  raw: unknown,
  answer: (claim: IdempotencyClaim) => Promise<void>,
): Promise<void> {
  const key = parseIdempotencyKey(request.headers['idempotency-key']) as string;
  // A call over its rate limit claims nothing: the verdict is in before the key is touched.
  await call.admission;
  const opened = await idempotency.open(call, key, submissionHash(door, call.taskType, raw));
  if (opened.replay !== undefined) {
    idempotency.recordReplay(call, opened.replay);
    return sendReplay(reply, opened.replay);
  }
  try {
    await answer(opened.claim);
  } catch (error) {
    await opened.claim.release();
    throw error;
  }
}

/** Stores a JSON answer under its claim, then sends it: a repeat sent once the client has it is a replay, never a 409. */
export async function sendJsonOnce(claim: IdempotencyClaim, reply: FastifyReply, meta: CompletionMeta, costNanos: bigint, body: string): Promise<void> {
  await claim.finish({ kind: 'json', body, headers: metaHeaders(meta), model: meta.model, route: storedRoute(meta.route) });
  await reply.status(200).headers(metaHeaders(meta, costNanos)).header('content-type', 'application/json; charset=utf-8').send(body);
}

/** Streams through a recorder: a stream that completed is stored before its `[DONE]` goes out; any other frees the key. */
export async function streamOnce(claim: IdempotencyClaim, reply: FastifyReply, stream: (sink: StreamSink) => Promise<void>): Promise<void> {
  const recorder = claim.recordStream(new ReplyStreamSink(reply));
  try {
    await stream(recorder);
  } finally {
    await claim.endStream(recorder, (meta) => metaHeaders(meta));
  }
}

/** A stored answer, as it was sent the first time: same body or events, same gateway headers, but free. */
async function sendReplay(reply: FastifyReply, stored: StoredResponse): Promise<void> {
  const headers = { ...stored.headers, 'x-gateway-cost-usd': '0', 'idempotent-replayed': 'true' };
  if (stored.kind === 'json') {
    await reply.status(200).headers(headers).header('content-type', 'application/json; charset=utf-8').send(stored.body);
    return;
  }
  // As a cache replay: in memory already, so it leaves in one write, with its length.
  const sink = new ReplyStreamSink(reply);
  sink.openWith(headers);
  for (const payload of stored.events) sink.event(payload);
  sink.close();
}

export function metaHeaders(meta: CompletionMeta, costNanos?: bigint): Record<string, string> {
  const headers: Record<string, string> = {
    'x-gateway-model': meta.model,
    'x-gateway-cache': meta.cache,
    'x-gateway-route': routeHeader(meta.route),
    ...meta.headers,
  };
  if (costNanos !== undefined) headers['x-gateway-cost-usd'] = formatUsd(costNanos);
  if (meta.upstreamMock) headers['x-gateway-upstream'] = 'mock';
  return headers;
}

/**
 * SSE straight onto the raw socket, no timers. Events that arrive together (one upstream read
 * usually carries several) leave as one chunk at the end of the current tick instead of one
 * chunk each: nothing waits for a later event, but a 15-event stream costs one chunked write
 * instead of fifteen (3 iovecs each, every string encoded separately by writev). The headers
 * go out with the first batch.
 *
 * A stream that ends in the tick it opened in (every cache replay; an upstream whose whole answer
 * came in one read) is one response of known length: headers and body leave in one plain write
 * with `content-length`, as a JSON answer does, instead of a chunked `writev` of four pieces.
 *
 * A client that reads slower than the upstream writes: once this process holds more than
 * `bufferBytes` for it, `backedUp` tells the stream loop to pull nothing more from the upstream
 * until 'drain', so the rest waits in the upstream's TCP window instead of in this process. Not at
 * the socket's first `false` (16 kB): a paused stream keeps its upstream connection out of the
 * pool (UPSTREAM_CONNECTIONS), so an answer of ordinary size is taken whole, as before, and its
 * connection freed; only a large one, to a reader that fell far behind, is paced. A reader that
 * takes nothing for `stallMs` while paced is disconnected: it would hold that connection for as
 * long as it kept its socket open. A client keeping up costs one property read per event; only a
 * paced one costs a promise, a timer and three listeners.
 */
export class ReplyStreamSink implements PacedStreamSink {
  static readonly DEFAULT_PACING: StreamPacing = { bufferBytes: 1024 * 1024, stallMs: 60_000 };

  private ended = false;
  private gone = false;
  /** Frames written during this tick, not sent yet; undefined when no flush is scheduled. */
  private pending: string | undefined;
  /** Set by `open` until the headers are written: with the first flush, or with the whole body. */
  private head: Record<string, string | number | string[]> | undefined;

  constructor(
    private readonly reply: FastifyReply,
    private readonly pacing: StreamPacing = ReplyStreamSink.DEFAULT_PACING,
  ) {
    reply.raw.once('close', () => {
      if (!this.ended) this.gone = true;
    });
  }

  get closed(): boolean {
    return this.gone || this.reply.raw.destroyed;
  }

  /** False once the socket is gone too (its buffer is dropped): there is nothing left to wait for then. */
  get backedUp(): boolean {
    const raw = this.reply.raw;
    return raw.writableNeedDrain && raw.writableLength > this.pacing.bufferBytes;
  }

  /**
   * Settles on 'drain', or when the client leaves ('close': no drain will ever come), or when
   * `signal` aborts (the shutdown deadline ends a stream in-band and must not wait for a reader
   * that never reads), or after `stallMs` without a drain, when the client is disconnected (the
   * loop then ends the stream as `client_closed`). Never rejects; whichever comes first removes
   * all three listeners and the timer.
   */
  drained(signal: AbortSignal): Promise<void> {
    const raw = this.reply.raw;
    if (!raw.writableNeedDrain || signal.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(stall);
        raw.off('drain', done);
        raw.off('close', done);
        signal.removeEventListener('abort', done);
        resolve();
      };
      // A reader that takes anything at all within stallMs is slow, not stalled: 'drain' only comes
      // once all is taken, which at a trickle can take longer than that.
      let held = raw.writableLength;
      const check = (): void => {
        if (raw.writableLength < held) {
          held = raw.writableLength;
          stall = setTimeout(check, this.pacing.stallMs);
          return;
        }
        this.gone = true;
        raw.destroy();
        done();
      };
      let stall = setTimeout(check, this.pacing.stallMs);
      raw.on('drain', done);
      raw.on('close', done);
      signal.addEventListener('abort', done);
    });
  }

  open(meta: CompletionMeta): void {
    this.openWith(metaHeaders(meta));
  }

  /** `open` with the gateway's headers given as they are (an idempotent replay sends the stored ones). */
  openWith(gatewayHeaders: Record<string, string>): void {
    // Headers set earlier on the Fastify reply (x-request-id, rate-limit trio) go out with ours.
    const carried = this.reply.getHeaders() as Record<string, string | number | string[]>;
    this.head = {
      ...carried,
      'content-type': 'text/event-stream; charset=utf-8',
      // No `connection` here: Node answers keep-alive by itself when the request allows it, and a
      // forced one overrode a client's `Connection: close` and the drain's (ShutdownService.track).
      'cache-control': 'no-cache',
      'x-accel-buffering': 'no',
      ...gatewayHeaders,
    };
    // Sent at the end of this tick, with the first events if they come in it, alone if not.
    this.queue('');
  }

  event(payload: string): void {
    if (this.closed) return;
    // An upstream may spread one event's JSON over several `data:` lines (the parser joins them
    // with "\n"); written raw, every line after the first reached the client without its prefix
    // and the SDK threw "malformed server-sent event JSON". A raw CR or LF in valid JSON is only
    // whitespace between tokens, so a space keeps the value and gives the one line per event
    // that OpenAI sends and that line-by-line clients read. A bare CR is an SSE line end too.
    if (payload.indexOf('\n') !== -1 || payload.indexOf('\r') !== -1) payload = payload.replace(LINE_BREAKS, ' ');
    this.queue(`data: ${payload}\n\n`);
  }

  close(): void {
    this.ended = true;
    const body = `${this.pending ?? ''}data: [DONE]\n\n`;
    this.pending = undefined;
    const raw = this.reply.raw;
    if (raw.destroyed) return;
    this.writeHead(Buffer.byteLength(body));
    raw.end(body);
  }

  private queue(frame: string): void {
    if (this.pending === undefined) {
      this.pending = frame;
      process.nextTick(flushSink, this);
    } else {
      this.pending += frame;
    }
  }

  /** @internal end of the tick: one write for everything queued in it. */
  flush(): void {
    const batch = this.pending;
    this.pending = undefined;
    const raw = this.reply.raw;
    if (batch === undefined || this.closed || raw.writableEnded) return;
    // Length unknown: the stream goes on after this tick, chunked.
    this.writeHead();
    if (batch === '') raw.flushHeaders();
    else raw.write(batch);
  }

  /** Writes the headers `open` holds, once: with the body's length when the whole stream is known. */
  private writeHead(contentLength?: number): void {
    if (this.head === undefined) return;
    this.reply.raw.writeHead(200, contentLength === undefined ? this.head : { ...this.head, 'content-length': contentLength });
    this.head = undefined;
  }
}

/** When a stream is paced for a slow reader, and when such a reader is given up on (see ReplyStreamSink). */
export interface StreamPacing {
  /** Bytes this process holds for one client before the upstream is paused. */
  bufferBytes: number;
  /** How long a paused stream waits for its client to take anything, before disconnecting it. */
  stallMs: number;
}

function flushSink(sink: ReplyStreamSink): void {
  sink.flush();
}
