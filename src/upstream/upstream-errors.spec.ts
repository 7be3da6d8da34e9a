import { describe, expect, it } from 'vitest';
import { UpstreamFailure } from './llm-client.js';
import { failureAction, upstreamToGatewayError } from './upstream-errors.js';

const MODEL = 'openai/gpt-4o';
const FLAGGED = 'openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for "harassment". No credits were charged.';

describe('upstreamToGatewayError: 403 and 408', () => {
  it("a moderation 403 is the caller's 400 (their input was flagged), with the upstream's message; never retried", () => {
    const failure = new UpstreamFailure('http', FLAGGED, 403, undefined, '403', true);
    const error = upstreamToGatewayError(failure, MODEL);
    expect(error.status).toBe(400);
    expect(error.type).toBe('invalid_request_error');
    expect(error.message).toContain('flagged for "harassment"');
    expect(error.message).not.toContain('credentials');
    expect(failureAction(failure)).toBe('stop');
  });

  it("any other 403 is still the upstream rejecting the gateway's credentials", () => {
    const error = upstreamToGatewayError(new UpstreamFailure('http', 'Key disabled', 403), MODEL);
    expect(error).toMatchObject({ status: 502, code: 'upstream_auth' });
  });

  it('a 408 that survives retries is a timeout (504), not a 502', () => {
    const failure = new UpstreamFailure('http', 'Request timed out', 408);
    expect(failureAction(failure)).toBe('retry');
    expect(upstreamToGatewayError(failure, MODEL, { attempts: 2 })).toMatchObject({ status: 504, code: 'upstream_timeout' });
  });
});

describe("upstreamToGatewayError: the upstream's retry-after", () => {
  it('stays on a mapped 429 (and 5xx) for the gateway to honour, and is never a header the caller is sent', () => {
    const limited = upstreamToGatewayError(new UpstreamFailure('http', 'Rate limit exceeded', 429, 30_000), MODEL, { attempts: 2 });
    expect(limited).toMatchObject({ status: 502, code: 'upstream_rate_limited', retryAfterMs: 30_000 });
    // A 429 of the gateway's own would carry retry-after; the upstream's wait is not the caller's.
    expect(limited.headers).toBeUndefined();
    expect(JSON.stringify(limited.toEnvelope())).not.toContain('30000');
    expect(upstreamToGatewayError(new UpstreamFailure('http', 'Service Unavailable', 503, 5_000), MODEL)).toMatchObject({
      code: 'upstream_error',
      retryAfterMs: 5_000,
    });
    expect(upstreamToGatewayError(new UpstreamFailure('http', 'Rate limit exceeded', 429), MODEL).retryAfterMs).toBeUndefined();
  });
});

describe("upstreamToGatewayError: an upstream 400's code and param", () => {
  const refusal = (code: string | undefined, param?: string) => {
    const failure = new UpstreamFailure('http', 'rejected', 400, undefined, code);
    failure.upstreamParam = param;
    return failure;
  };
  const wire = (failure: UpstreamFailure, callerNamedModel?: boolean) => upstreamToGatewayError(failure, 'openai/gpt-4o-mini', { callerNamedModel }).toEnvelope().error;

  it('relays a word the caller can act on, with the field it names', () => {
    expect(wire(refusal('context_length_exceeded', 'messages'))).toMatchObject({ type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' });
  });

  it.each(['invalid_api_key', 'rate_limit_exceeded', 'budget_exceeded', 'model_not_allowed', 'idempotency_key_reused'])(
    "never relays %s, one of the gateway's own codes with another meaning",
    (code) => {
      expect(wire(refusal(code))).toMatchObject({ code: 'invalid_value' });
    },
  );

  it("does not blame the caller for a model the routing table chose, but does for the caller's own", () => {
    expect(wire(refusal('model_not_found', 'model'), false)).toMatchObject({ code: 'invalid_value', param: null });
    expect(wire(refusal('model_not_found', 'model'), true)).toMatchObject({ code: 'model_not_found', param: 'model' });
  });
});
