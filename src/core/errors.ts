import { errorEnvelope, type ErrorEnvelope } from '../../libs/openai-contract/src/index.js';

/**
 * The gateway's one error vocabulary. Services throw `GatewayError(code, …)`; the global filter
 * renders it as the OpenAI envelope with the status and type from this table, so a status can
 * never drift from its code. `satisfies` makes the compiler insist every code has a row.
 */
export type ErrorCode =
  | 'invalid_value'
  | 'content_flagged'
  | 'missing_field'
  | 'invalid_json'
  | 'unknown_task_type'
  | 'model_not_found'
  | 'model_not_allowed'
  | 'invalid_api_key'
  | 'budget_exceeded'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'request_in_progress'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'idempotency_key_reused'
  | 'rate_limit_exceeded'
  | 'upstream_error'
  | 'upstream_auth'
  | 'upstream_insufficient_credits'
  | 'upstream_rate_limited'
  | 'upstream_bad_response'
  | 'upstream_timeout'
  | 'queue_full'
  | 'unavailable'
  | 'client_closed'
  | 'internal_error';

export type ErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'insufficient_quota'
  | 'permission_error'
  | 'not_found_error'
  | 'conflict_error'
  | 'rate_limit_error'
  | 'upstream_error'
  | 'overloaded_error'
  | 'api_error';

export const ERROR_TABLE = {
  invalid_value: { status: 400, type: 'invalid_request_error' },
  // The upstream's moderation refused the input: the caller's content, not the gateway's credentials.
  content_flagged: { status: 400, type: 'invalid_request_error' },
  missing_field: { status: 400, type: 'invalid_request_error' },
  invalid_json: { status: 400, type: 'invalid_request_error' },
  unknown_task_type: { status: 400, type: 'invalid_request_error' },
  model_not_found: { status: 400, type: 'invalid_request_error' },
  model_not_allowed: { status: 400, type: 'invalid_request_error' },
  invalid_api_key: { status: 401, type: 'authentication_error' },
  budget_exceeded: { status: 402, type: 'insufficient_quota' },
  forbidden: { status: 403, type: 'permission_error' },
  not_found: { status: 404, type: 'not_found_error' },
  conflict: { status: 409, type: 'conflict_error' },
  request_in_progress: { status: 409, type: 'conflict_error' },
  payload_too_large: { status: 413, type: 'invalid_request_error' },
  unsupported_media_type: { status: 415, type: 'invalid_request_error' },
  idempotency_key_reused: { status: 422, type: 'invalid_request_error' },
  rate_limit_exceeded: { status: 429, type: 'rate_limit_error' },
  upstream_error: { status: 502, type: 'upstream_error' },
  upstream_auth: { status: 502, type: 'upstream_error' },
  upstream_insufficient_credits: { status: 502, type: 'upstream_error' },
  upstream_rate_limited: { status: 502, type: 'upstream_error' },
  upstream_bad_response: { status: 502, type: 'upstream_error' },
  upstream_timeout: { status: 504, type: 'upstream_error' },
  queue_full: { status: 503, type: 'overloaded_error' },
  unavailable: { status: 503, type: 'overloaded_error' },
  // The caller closed its connection before the answer (or the drain deadline closed it): nobody
  // reads this. It is what the audit row, the metrics and the log say, as 499 (nginx's "client
  // closed request"), so a client leaving never counts as the upstream failing (502).
  client_closed: { status: 499, type: 'invalid_request_error' },
  internal_error: { status: 500, type: 'api_error' },
} as const satisfies Record<ErrorCode, { status: number; type: ErrorType }>;

/**
 * Answered with `x-should-retry: false`, which the official OpenAI SDKs obey (they otherwise retry
 * every 5xx twice): failures the gateway has already retried as far as it would, where a client's
 * repeat only multiplies the upstream's load and the caller's wait. The gateway's key or credit
 * refused (the gateway stops at once: every model would fail the same way), and a 504 (the
 * upstream deadline, or the upstream's own timeout after the retries, spent): the SDK's two
 * retries made a hung upstream cost the caller three deadlines. Other 502s stay retryable: an
 * upstream 5xx or rate limit may have passed seconds later.
 */
export const NO_CLIENT_RETRY: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['upstream_auth', 'upstream_insufficient_credits', 'upstream_timeout']);

export interface GatewayErrorOptions {
  param?: string | null;
  /** Response headers that belong to this error (retry-after on 429, …). */
  headers?: Record<string, string>;
  cause?: unknown;
  /** Extra fields rendered inside `error` (e.g. `resets_at` on budget_exceeded). */
  details?: Record<string, unknown>;
  /**
   * How long an upstream asked the gateway to wait (its retry-after). Never rendered: it is the
   * gateway's to honour (a job's next try), not a wait the caller was asked for.
   */
  retryAfterMs?: number;
  /**
   * The code the caller sees instead of `code`: an upstream's own, relayed with its 400 (OpenAI's
   * `context_length_exceeded`, which clients branch on to trim and retry). Metrics, logs and the
   * audit keep `code`, from the gateway's own vocabulary.
   */
  wireCode?: string;
}

export class GatewayError extends Error {
  readonly param: string | null;
  readonly headers: Record<string, string> | undefined;
  readonly details: Record<string, unknown> | undefined;
  readonly retryAfterMs: number | undefined;
  readonly wireCode: string | undefined;

  constructor(
    readonly code: ErrorCode,
    message: string,
    options: GatewayErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'GatewayError';
    this.param = options.param ?? null;
    this.headers = options.headers;
    this.details = options.details;
    this.retryAfterMs = options.retryAfterMs;
    this.wireCode = options.wireCode;
  }

  get status(): number {
    return ERROR_TABLE[this.code].status;
  }

  get type(): ErrorType {
    return ERROR_TABLE[this.code].type;
  }

  toEnvelope(): ErrorEnvelope {
    const envelope = errorEnvelope(this.message, this.type, this.wireCode ?? this.code, this.param);
    if (this.details) Object.assign(envelope.error, this.details);
    return envelope;
  }
}

export function isGatewayError(value: unknown): value is GatewayError {
  return value instanceof GatewayError;
}

/**
 * The HTTP status an error code is answered with, for a code seen only as a string (an outcome
 * in a log line, an audit row, a metric); undefined for an outcome that is no error code.
 */
export function statusOfCode(code: string): number | undefined {
  return Object.hasOwn(ERROR_TABLE, code) ? ERROR_TABLE[code as ErrorCode].status : undefined;
}
