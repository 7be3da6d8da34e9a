import { describe, expect, it } from 'vitest';
import { REDACTED, redactedSummary, redactText } from './redact.js';

describe('redacted body summaries', () => {
  it('masks credential fields by name and keeps ordinary ones', () => {
    expect(
      redactedSummary({
        user_id: 'u1',
        key: 'gh-abc',
        api_key: 'x',
        client_secret: 'x',
        authorization: 'x',
        password: 'x',
        nested: { token: 'x', access_token: 'x' },
        max_tokens: 5,
        tokens_per_minute: 100,
        key_id: 'k1',
        name: 'ci',
      }),
    ).toEqual({
      user_id: 'u1',
      key: REDACTED,
      api_key: REDACTED,
      client_secret: REDACTED,
      authorization: REDACTED,
      password: REDACTED,
      nested: { token: REDACTED, access_token: REDACTED },
      max_tokens: 5,
      tokens_per_minute: 100,
      key_id: 'k1',
      name: 'ci',
    });
  });

  it('masks credential-shaped values wherever they appear', () => {
    const key = `gh-${'A'.repeat(43)}`;
    expect(redactText(`my key is ${key}, upstream sk-or-v1-abcdef123456`)).toBe(`my key is ${REDACTED}, upstream ${REDACTED}`);
    expect(redactedSummary({ note: `Bearer ${key}`, list: [key] })).toEqual({ note: REDACTED, list: [REDACTED] });
  });
});
