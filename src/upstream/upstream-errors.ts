import { ERROR_TABLE, GatewayError } from '../core/errors.js';
import type { UpstreamFailure } from './llm-client.js';

/**
 * What a failed attempt allows next (issue #4's retry policy, as data):
 *  - `retry`: the same model again after a backoff (then the next model once its tries are spent);
 *  - `next_model`: no point asking this model again, but another one may answer;
 *  - `stop`: every model would fail the same way (our key, our credit, the caller's own request).
 */
export type FailureAction = 'retry' | 'next_model' | 'stop';

/** Transient by nature: overload, rate limits, gateway hiccups, request timeouts. 529 = "overloaded". */
const RETRY_STATUSES: ReadonlySet<number> = new Set([408, 429, 500, 502, 503, 504, 529]);

/**
 * The upstream does not know the model it was asked for, or it is gone: 404/410, a 400 whose code
 * says so, or OpenRouter's 400 for an id it has never heard of (`{"error":{"message":"<id> is not
 * a valid model ID","code":400}}`: a numeric code and no param, so only the message tells it from
 * a bad request). Says nothing about the next model, and is the caller's mistake only when the
 * caller named the model (a retired or misspelt id in the routing table is the gateway's).
 */
export function isUnknownModel(failure: UpstreamFailure): boolean {
  if (failure.kind !== 'http') return false;
  if (failure.status === 404 || failure.status === 410) return true;
  return failure.status === 400 && (failure.upstreamCode === 'model_not_found' || NOT_A_VALID_MODEL_ID.test(failure.message));
}

/** OpenRouter's whole message, the id (never a space in it) first: another 400 merely mentioning one does not match. */
const NOT_A_VALID_MODEL_ID = /^\S+ is not a valid model ID$/;

/**
 * `hasNextModel`: another model of the chain is still to be tried after this one. A timeout then
 * hands over to it: a model that did not answer in time is likely overloaded, and asking it again
 * would spend the deadline the next one needs (a hung primary used to get both its tries and leave
 * its healthy fallback none). Only the chain's last model, with no one to hand over to, is retried.
 */
export function failureAction(failure: UpstreamFailure, hasNextModel = false): FailureAction {
  switch (failure.kind) {
    case 'timeout':
      return hasNextModel ? 'next_model' : 'retry';
    case 'connection':
    case 'bad_response':
    case 'cut':
      return 'retry';
    case 'aborted':
      return 'stop';
    case 'http': {
      const status = failure.status ?? 502;
      if (RETRY_STATUSES.has(status)) return 'retry';
      if (status >= 500 || isUnknownModel(failure)) return 'next_model';
      // 400/401/402/403/413/422 and the rest of 4xx: the request or our account, not the model.
      return 'stop';
    }
  }
}

/** Kept for callers that only ask "may another attempt help?". */
export function isRetryable(failure: UpstreamFailure): boolean {
  return failureAction(failure) !== 'stop';
}

export interface ErrorContext {
  /** true when the caller named this model; an unknown model is then the caller's 400, else ours. */
  callerNamedModel?: boolean;
  /** Appended to the message: how many attempts were made. */
  attempts?: number;
}

/**
 * The upstream's problems never look like the caller's own limits (API.md "Decisions"): our key
 * being rejected, out of credit or rate limited is a 502 with a precise code, never 401/402/429.
 * A 4xx about the request itself is the caller's to fix and keeps its 400.
 */
export function upstreamToGatewayError(failure: UpstreamFailure, model: string, context: ErrorContext = {}): GatewayError {
  const where = `upstream (${model})`;
  const tail = context.attempts !== undefined && context.attempts > 1 ? ` (${context.attempts} attempts)` : '';
  switch (failure.kind) {
    case 'timeout':
      return new GatewayError('upstream_timeout', `The ${where} did not answer in time${tail}.`);
    case 'connection':
      return new GatewayError('upstream_error', `Could not reach the ${where}${tail}.`);
    case 'bad_response':
      return new GatewayError('upstream_bad_response', `The ${where} sent a malformed response${tail}.`);
    case 'cut':
      return new GatewayError('upstream_error', `The ${where} stream broke off before it finished${tail}.`);
    case 'aborted':
      return new GatewayError('client_closed', 'The request was cancelled before the upstream answered.');
    case 'http':
      break;
  }
  const status = failure.status ?? 502;
  // Kept on the errors another try may cure, for whoever tries later (a job's next try waits at
  // least this long); never a response header: the upstream asked the gateway to wait, not the caller.
  const wait = { retryAfterMs: failure.retryAfterMs };
  // OpenRouter answers 403 for input its moderation flagged: the caller's request, not our key. Its
  // message says why (the reasons), not what: the flagged text stays in the metadata, unrelayed.
  if (status === 403 && failure.flagged) return new GatewayError('content_flagged', `The ${where} flagged the input: ${printable(failure.message)}`);
  if (status === 401 || status === 403) return new GatewayError('upstream_auth', `The ${where} rejected the gateway's credentials.`);
  // Still a timeout after the retries (the upstream's own request timeout): 504, as ours would be.
  if (status === 408) return new GatewayError('upstream_timeout', `The ${where} timed out answering${tail}.`, wait);
  if (status === 402) return new GatewayError('upstream_insufficient_credits', `The ${where} reports insufficient credits.`);
  if (status === 429) return new GatewayError('upstream_rate_limited', `The ${where} is rate limiting the gateway; try again later${tail}.`, wait);
  if (isUnknownModel(failure)) {
    // Only the caller's own choice of model is the caller's mistake; a model the routing table
    // chose is the gateway's configuration problem.
    if (context.callerNamedModel === true)
      return new GatewayError('model_not_found', `The ${where} does not know this model: ${failure.message}`, { param: 'model' });
    return new GatewayError('upstream_error', `The ${where} does not know the model the routing table chose: ${failure.message}`);
  }
  if (status === 413) return new GatewayError('payload_too_large', `The ${where} rejected the request: ${failure.message}`);
  if (status === 400 || status === 422) {
    // The upstream's code and param tell the caller what to fix (`context_length_exceeded` on
    // `messages`: trim the history and retry); relayed when they are plain tokens. Never one of
    // the gateway's own codes (an upstream `invalid_api_key` is not the caller's key, nor its
    // `budget_exceeded` the caller's budget), nor a complaint about a model the routing table
    // chose, which is not the caller's to fix (as on a 404).
    const aboutOurModel = context.callerNamedModel !== true && (failure.upstreamParam === 'model' || /model/i.test(failure.upstreamCode ?? ''));
    const code = relayable(failure.upstreamCode, RELAYABLE_CODE);
    return new GatewayError('invalid_value', `The ${where} rejected the request: ${failure.message}`, {
      param: aboutOurModel ? undefined : relayable(failure.upstreamParam, RELAYABLE_PARAM),
      wireCode: aboutOurModel || code === undefined || Object.hasOwn(ERROR_TABLE, code) ? undefined : code,
    });
  }
  return new GatewayError('upstream_error', `The ${where} failed with HTTP ${status}${tail}.`, wait);
}

// A code is a word (`context_length_exceeded`), never OpenRouter's numeric HTTP status (`400`);
// a param a field path (`messages[0].content`).
const RELAYABLE_CODE = /^(?=.*[A-Za-z])[A-Za-z0-9_.:-]{1,64}$/;
const RELAYABLE_PARAM = /^[\x21-\x7e]{1,128}$/;

function relayable(value: string | undefined, shape: RegExp): string | undefined {
  return value !== undefined && shape.test(value) ? value : undefined;
}

/** An upstream's text as one line of printable characters (it goes into our error message). */
function printable(text: string): string {
  let out = '';
  for (const char of text) {
    const c = char.charCodeAt(0);
    out += c < 0x20 || c === 0x7f ? ' ' : char;
  }
  return out.trim();
}
