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

  // The cuts per string and per level bound no total: a 3.8 MB body once left a 3.78 MB audit row.
  it('keeps a summary up to its budget, and beyond it only its size, the same for the same body', () => {
    expect(redactedSummary({ a: 'xx' }, 10)).toEqual({ a: 'xx' });
    expect(redactedSummary({ a: 'xx' }, 9)).toEqual({ '[truncated]': true, bytes: 10 });

    const s = 'x'.repeat(499);
    const big = { name: 'big', pad: Array.from({ length: 50 }, () => [s, s, s]) };
    expect(redactedSummary(big)).toEqual({ '[truncated]': true, bytes: Buffer.byteLength(JSON.stringify(big)) });
    const fits = { name: 'ci', pad: Array.from({ length: 5 }, () => [s, s, s]) };
    expect(redactedSummary(fits)).toEqual(fits);
  });
});
