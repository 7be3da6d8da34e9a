import type { FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';
import { wantsAsync } from '../core/prefer.js';
import { parseCallbackUrl, unstorableIn } from './async-submit.js';

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
    expect(unstorableIn({ messages: [{ role: 'user', content: 'a\u0000b' }] })).toBe('nul');
    expect(unstorableIn({ metadata: { 'k\u0000': 'v' } })).toBe('nul');
    expect(unstorableIn({ messages: [{ role: 'user', content: 'escape it as \\u0000 in JSON' }] })).toBeUndefined();
    expect(unstorableIn({ messages: [{ role: 'user', content: 'plain' }], temperature: 0 })).toBeUndefined();
  });

  it('finds a lone surrogate (high or low) in any string or key, and not a whole pair; a U+0000 anywhere is named first', () => {
    expect(unstorableIn({ messages: [{ role: 'user', content: 'cut \ud83d' }] })).toBe('lone_surrogate');
    expect(unstorableIn({ messages: [{ role: 'user', content: '\ude00 cut' }] })).toBe('lone_surrogate');
    expect(unstorableIn({ metadata: { 'k\udbff': 'v' } })).toBe('lone_surrogate');
    expect(unstorableIn({ messages: [{ role: 'user', content: 'whole \ud83d\ude00 \u{10FFFF}' }] })).toBeUndefined();
    expect(unstorableIn({ messages: [{ role: 'user', content: 'cut \ud83d' }], metadata: { k: 'a\u0000b' } })).toBe('nul');
    // Called again and again, as the pattern it shares with the audit writer is global there.
    for (let i = 0; i < 3; i += 1) expect(unstorableIn(['\ud83d'])).toBe('lone_surrogate');
  });
});
