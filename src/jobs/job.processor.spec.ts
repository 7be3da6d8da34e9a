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
  it('are sha256=<hex HMAC of the exact body>', () => {
    // Known vector: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
    expect(signCallback('key', 'The quick brown fox jumps over the lazy dog')).toBe('sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8');
  });
});
