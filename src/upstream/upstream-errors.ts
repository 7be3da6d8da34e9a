import { GatewayError } from '../core/errors.js';
import type { UpstreamFailure } from './llm-client.js';

/** Failures worth another attempt or the next model in the chain (issue #4's retry policy). */
export function isRetryable(failure: UpstreamFailure): boolean {
  switch (failure.kind) {
    case 'timeout':
    case 'connection':
    case 'bad_response':
    case 'cut':
      return true;
    case 'aborted':
      return false;
    case 'http':
      return failure.status === 429 || failure.status === 408 || (failure.status !== undefined && failure.status >= 500);
  }
}

/**
 * The upstream's problems never look like the caller's own limits (API.md "Decisions"): our key
 * being rejected, out of credit or rate limited is a 502 with a precise code, never 401/402/429.
 * A 4xx about the request itself is the caller's to fix and keeps its 400.
 */
export function upstreamToGatewayError(failure: UpstreamFailure, model: string): GatewayError {
  const where = `upstream (${model})`;
  switch (failure.kind) {
    case 'timeout':
      return new GatewayError('upstream_timeout', `The ${where} did not answer in time.`);
    case 'connection':
      return new GatewayError('upstream_error', `Could not reach the ${where}.`);
    case 'bad_response':
      return new GatewayError('upstream_bad_response', `The ${where} sent a malformed response.`);
    case 'cut':
      return new GatewayError('upstream_error', `The ${where} stream broke off before it finished.`);
    case 'aborted':
      return new GatewayError('upstream_error', 'The request was cancelled before the upstream answered.');
    case 'http':
      break;
  }
  const status = failure.status ?? 502;
  if (status === 401 || status === 403) return new GatewayError('upstream_auth', `The ${where} rejected the gateway's credentials.`);
  if (status === 402) return new GatewayError('upstream_insufficient_credits', `The ${where} reports insufficient credits.`);
  if (status === 429) return new GatewayError('upstream_rate_limited', `The ${where} is rate limiting the gateway; try again later.`);
  if (status === 404) return new GatewayError('model_not_found', `The ${where} does not know this model: ${failure.message}`, { param: 'model' });
  if (status === 400 || status === 413 || status === 422) {
    return new GatewayError(status === 413 ? 'payload_too_large' : 'invalid_value', `The ${where} rejected the request: ${failure.message}`);
  }
  return new GatewayError('upstream_error', `The ${where} failed with HTTP ${status}.`);
}
