import type { ChatCompletion, ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import { statusOfCode } from '../core/errors.js';
import type { Principal } from '../identity/principal.js';
import type { ResolvedRoute } from '../routing/routing-table.js';

export type Door = 'chat' | 'complete' | 'job';
export type CacheStatus = 'hit' | 'miss' | 'bypass';

/** Everything the pipeline needs about one call, whichever door it came through. */
export interface CompletionCall {
  principal: Principal;
  requestId: string;
  /** The OpenAI body as sent by the client (validated at the edge). */
  body: ChatCompletionRequest;
  taskType: string | undefined;
  door: Door;
  /** Aborted when the client goes away. */
  signal: AbortSignal;
  /**
   * Aborts `signal` from outside, as the client leaving would: the shutdown drain's deadline
   * ends streams with it. Set by doors that own the signal's controller.
   */
  abort?: (reason: unknown) => void;
  cacheControl: { read: boolean; write: boolean; ttlSeconds: number | undefined };
  /**
   * The door's rate-limit verdict when it is still in flight (HTTP doors defer it, see
   * `DeferredAdmission`): the pipeline awaits it before anything has an effect. Rejects with 429.
   */
  admission?: Promise<void>;
  /**
   * Set once the pipeline has taken over recording this call: its audit event and its log line
   * (answer, failure or refusal), written now or, for a stream, when it ends. An HTTP door's
   * hooks then write neither a second time: the audit hook's error row, the access log line.
   */
  audited?: boolean;
}

export interface CompletionMeta {
  model: string;
  /**
   * A cache hit's model as the ledger and metrics count it: the one its miss was recorded as (the
   * model asked for, not `model`, the upstream's own name). Undefined when an attempt says it.
   */
  recordedModel?: string;
  route: ResolvedRoute;
  cache: CacheStatus;
  upstreamMock: boolean;
  /** Extra response headers from pipeline stages (rate-limit trio, …). */
  headers: Record<string, string>;
}

export interface JsonOutcome {
  completion: ChatCompletion;
  /** The response body to send as is (upstream bytes, or the cached copy). */
  raw: string;
  costNanos: bigint;
  meta: CompletionMeta;
}

/**
 * Where a stream goes. `open` commits the status and headers (the HTTP sink sends them at the end
 * of the tick, with the first events, or with the whole body when the stream ends in that tick).
 * After it, no retry or fallback is possible and a failure is reported in-band as an SSE error
 * event.
 */
export interface StreamSink {
  open(meta: CompletionMeta): void;
  event(payload: string): void;
  /** Ends the stream with `data: [DONE]`. */
  close(): void;
  /** True once the client went away. */
  readonly closed: boolean;
}

/**
 * A sink whose client can fall behind (the HTTP door's). While `backedUp`, the stream loop pulls
 * nothing more from the upstream until `drained` settles. Other sinks need neither.
 */
export interface PacedStreamSink extends StreamSink {
  /** The client is far behind: the sink holds more for it than it will buffer (ReplyStreamSink: 1 MiB). */
  readonly backedUp: boolean;
  /** Settles once the client drained, left or was given up on, or `signal` aborted; never rejects. */
  drained(signal: AbortSignal): Promise<void>;
}

/**
 * The status a pipeline call was answered with, as its log line and its metrics report it: 200 once
 * a JSON answer or a stream went out (however the stream ended), else its error code's, 500 for an
 * outcome that is no error code. (The audit row keeps null for the last: a column, not a guess.)
 */
export function answeredStatus(meta: CompletionMeta | undefined, outcome: string): number {
  return meta !== undefined ? 200 : (statusOfCode(outcome) ?? 500);
}
