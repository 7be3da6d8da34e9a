import { describe, expect, it } from 'vitest';
import { GatewayError } from '../core/errors.js';
import { signCallback } from './job-callbacks.js';
import { isTransient } from './job.processor.js';

describe('which job failures are retried', () => {
  it('retries upstream and dependency failures (5xx) and rate limits; fails the request’s own 4xx at once', () => {
    const transient = [
      'upstream_error',
      'upstream_timeout',
      'upstream_rate_limited',
      'upstream_bad_response',
      'unavailable',
      'internal_error',
      'rate_limit_exceeded',
    ] as const;
    const permanent = ['budget_exceeded', 'invalid_value', 'invalid_api_key', 'model_not_found', 'payload_too_large', 'model_not_allowed'] as const;
    for (const code of transient) expect(isTransient(new GatewayError(code, 'x')), code).toBe(true);
    for (const code of permanent) expect(isTransient(new GatewayError(code, 'x')), code).toBe(false);
  });

  it('fails at once when the upstream refuses the gateway’s key or credit (502s that no retry can fix), as the sync path stops on them', () => {
    for (const code of ['upstream_auth', 'upstream_insufficient_credits'] as const) {
      const error = new GatewayError(code, 'x');
      expect(error.status, code).toBe(502);
      expect(isTransient(error), code).toBe(false);
    }
  });
});

describe('callback signatures', () => {
  it('are t=<unix seconds>,v1=<hex HMAC of "<t>.<exact body>">, so the time cannot be changed without the secret', () => {
    // Computed apart from this code: printf '%s' '1700000000.{"id":"job"}' | openssl dgst -sha256 -hmac key
    expect(signCallback('key', 1_700_000_000, '{"id":"job"}')).toBe('t=1700000000,v1=55f78dbe36e81d25c38cb6576c44ec7e55398c12567d9057e7f9cc3ab36d06f3');
    // The same body at another time is another signature: a captured delivery cannot be re-dated.
    expect(signCallback('key', 1_700_000_001, '{"id":"job"}')).not.toContain('55f78dbe');
  });
});
