import type { FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';
import { holdsNul, parseCallbackUrl, parseIdempotencyKey, submissionHash, wantsAsync } from './async-submit.js';

const withPrefer = (prefer: string | string[] | undefined) => ({ headers: { prefer } }) as unknown as FastifyRequest;

describe('async submit parsing', () => {
  it('recognises prefer: respond-async among other preferences, in any case (RFC 7240)', () => {
    expect(wantsAsync(withPrefer('respond-async'))).toBe(true);
    expect(wantsAsync(withPrefer('return=minimal, Respond-Async; wait=10'))).toBe(true);
    expect(wantsAsync(withPrefer(['return=minimal', 'respond-async']))).toBe(true);
    expect(wantsAsync(withPrefer('return=representation'))).toBe(false);
    expect(wantsAsync(withPrefer('respond-asynchronously'))).toBe(false);
    expect(wantsAsync(withPrefer(undefined))).toBe(false);
  });

  it('takes idempotency keys of printable characters only, naming the header when wrong', () => {
    expect(parseIdempotencyKey(undefined)).toBeUndefined();
    expect(parseIdempotencyKey('order-42:retry_1')).toBe('order-42:retry_1');
    for (const bad of ['', 'with space', 'x'.repeat(256), ['a', 'b']]) {
      expect(() => parseIdempotencyKey(bad)).toThrow(expect.objectContaining({ code: 'invalid_value', param: 'idempotency-key' }));
    }
  });

  it('takes absolute http(s) callback URLs without credentials', () => {
    expect(parseCallbackUrl(undefined)).toBeUndefined();
    expect(parseCallbackUrl('https://hooks.example.test/a?b=c')).toBe('https://hooks.example.test/a?b=c');
    for (const bad of ['ftp://x.test/', '/relative', 'https://user:pw@x.test/', 42, 'https://x.test/' + 'a'.repeat(2100)]) {
      expect(() => parseCallbackUrl(bad)).toThrow(expect.objectContaining({ code: 'invalid_value', param: 'callback_url' }));
    }
  });

  it('finds a U+0000 in any string or key of a body, and not the six characters \\u0000 written as text', () => {
    expect(holdsNul({ messages: [{ role: 'user', content: 'a\u0000b' }] })).toBe(true);
    expect(holdsNul({ metadata: { 'k\u0000': 'v' } })).toBe(true);
    expect(holdsNul({ messages: [{ role: 'user', content: 'escape it as \\u0000 in JSON' }] })).toBe(false);
    expect(holdsNul({ messages: [{ role: 'user', content: 'plain' }], temperature: 0 })).toBe(false);
  });

  it('hashes door, task type and body, so the same key with another request is told apart', () => {
    const body = { messages: [{ role: 'user', content: 'x' }] };
    expect(submissionHash('chat', undefined, body)).toBe(submissionHash('chat', undefined, { messages: [{ role: 'user', content: 'x' }] }));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('complete', undefined, body));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('chat', 'code', body));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('chat', undefined, { messages: [{ role: 'user', content: 'y' }] }));
  });
});
