import type { FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';
import { wantsAsync } from '../core/prefer.js';
import { holdsNul, parseCallbackUrl } from './async-submit.js';

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
});
