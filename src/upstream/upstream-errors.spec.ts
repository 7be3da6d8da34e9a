import { describe, expect, it } from 'vitest';
import { UpstreamFailure } from './llm-client.js';
import { failureAction, isUnknownModel, upstreamToGatewayError } from './upstream-errors.js';

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
    expect(wire(refusal('model_not_found', 'model'), false)).toMatchObject({ type: 'upstream_error', code: 'upstream_error', param: null });
    expect(wire(refusal('model_not_found', 'model'), true)).toMatchObject({ code: 'model_not_found', param: 'model' });
    // Any other refusal naming the table's model is still no field of the caller's to fix.
    expect(wire(refusal('invalid_model_parameters', 'model'), false)).toMatchObject({ code: 'invalid_value', param: null });
  });
});

describe('an unknown model: 404/410, and OpenRouter\'s 400 "<id> is not a valid model ID"', () => {
  const ID = 'anthropic/claude-3.5-sonet';
  // OpenRouter's real answer: HTTP 400, `{"error":{"message":"<id> is not a valid model ID","code":400}}`.
  const notValid = () => new UpstreamFailure('http', `${ID} is not a valid model ID`, 400, undefined, '400');

  it.each([
    ['404', new UpstreamFailure('http', 'Model not found', 404)],
    ['410', new UpstreamFailure('http', 'Model retired', 410)],
    ["OpenRouter's 400", notValid()],
    ['a 400 coded model_not_found', new UpstreamFailure('http', 'The model does not exist', 400, undefined, 'model_not_found')],
    ['the same 400 reported inside a 200', new UpstreamFailure('http', 'gpt-5-typo is not a valid model ID', 400, undefined, '400')],
  ])('%s is an unknown model: the next model may answer', (_name, failure) => {
    expect(isUnknownModel(failure)).toBe(true);
    expect(failureAction(failure)).toBe('next_model');
  });

  it.each([
    ['a 400 about something else', new UpstreamFailure('http', 'messages must not be empty', 400, undefined, '400')],
    ['a 400 merely quoting the phrase', new UpstreamFailure('http', 'Invalid request: "x is not a valid model ID" in tool name', 400)],
    [
      'a 400 naming the model as its param',
      Object.assign(new UpstreamFailure('http', 'rejected', 400, undefined, 'invalid_value'), { upstreamParam: 'model' }),
    ],
    ['the phrase on a 422', new UpstreamFailure('http', `${ID} is not a valid model ID`, 422)],
    ['a timeout', new UpstreamFailure('timeout', `${ID} is not a valid model ID`)],
  ])('%s is not an unknown model', (_name, failure) => {
    expect(isUnknownModel(failure)).toBe(false);
    expect(failureAction(failure)).not.toBe('next_model');
  });

  it("is the routing table's problem (502) for a model the table chose, the caller's 400 model_not_found for its own", () => {
    const table = upstreamToGatewayError(notValid(), ID, { attempts: 1 });
    expect(table).toMatchObject({ status: 502, code: 'upstream_error' });
    expect(table.message).toBe(`The upstream (${ID}) does not know the model the routing table chose: ${ID} is not a valid model ID`);
    expect(upstreamToGatewayError(notValid(), ID, { callerNamedModel: true }).toEnvelope().error).toMatchObject({
      type: 'invalid_request_error',
      code: 'model_not_found',
      param: 'model',
    });
  });
});
