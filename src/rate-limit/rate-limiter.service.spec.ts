import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../core/logger.js';
import { FallbackState } from '../redis/fallback-state.js';
import type { AppConfig } from '../config/config.js';
import { ManualClock } from '../core/clock.js';
import type { Principal } from '../identity/principal.js';
import { MemoryRateLimitStore } from './memory-rate-limit.store.js';
import type { Limit, RateLimitOverrides } from './rate-limit-overrides.service.js';
import { formatReset, RateLimiter } from './rate-limiter.service.js';

describe('formatReset (OpenAI header format)', () => {
  it.each([
    [0, '0ms'],
    [250.2, '251ms'],
    [1000, '1s'],
    [17_001, '18s'],
    [59_999, '1m0s'],
    [60_000, '1m0s'],
    [61_000, '1m1s'],
  ])('%d ms → %s', (ms, text) => {
    expect(formatReset(ms)).toBe(text);
  });
});

describe('FallbackState', () => {
  it('logs an outage and a recovery once each, however many requests see them', () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const state = new FallbackState(createLogger('info', sink), { degraded: 'went away', recovered: 'came back' });
    state.ok();
    for (let i = 0; i < 100; i++) state.fail('ECONNREFUSED');
    expect(state.degraded).toBe(true);
    expect(state.describe()).toMatchObject({ reason: 'ECONNREFUSED' });
    for (let i = 0; i < 100; i++) state.ok();
    expect(state.degraded).toBe(false);
    expect(lines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['went away', 'came back']);
  });

  it('recovers on a recheck only when its probe succeeds, with one probe at a time', async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const state = new FallbackState(createLogger('info', sink), { degraded: 'went away', recovered: 'came back' });
    let probes = 0;
    const refused = () => {
      probes++;
      return Promise.reject(new Error('READONLY You can\'t write against a read only replica.'));
    };
    state.recheck(refused);
    expect(probes).toBe(0); // nothing to find out while up
    state.fail('connection reconnecting');
    state.recheck(refused);
    state.recheck(refused);
    expect(probes).toBe(1);
    await new Promise((resolve) => setImmediate(resolve));
    expect(state.degraded).toBe(true);
    expect(state.describe()).toMatchObject({ reason: expect.stringMatching(/^READONLY/) });
    state.recheck(() => Promise.resolve('OK'));
    await new Promise((resolve) => setImmediate(resolve));
    expect(state.degraded).toBe(false);
    expect(lines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['went away', 'came back']);
  });
});

describe('RateLimiter: a refusal by one of two full counters', () => {
  // Before, the x-ratelimit-* trio showed the counter with the least left (the key's, resetting
  // soon) while retry-after and param named the one that refused longest (the user's).
  it('describes the refusing counter in the headers, as retry-after and param do', async () => {
    const clock = new ManualClock(Date.parse('2026-03-01T10:00:00Z'));
    const limits: Record<string, Limit> = { 'key:k1': { requestsPerMinute: 1, tokensPerMinute: undefined }, 'user:u': { requestsPerMinute: 2, tokensPerMinute: undefined } };
    const overrides = {
      get: (scope: string, id: string) => limits[`${scope}:${id}`],
      defaults: () => ({ requestsPerMinute: 1000, tokensPerMinute: undefined }),
    } as unknown as RateLimitOverrides;
    const limiter = new RateLimiter(new MemoryRateLimitStore(clock), overrides, { rateLimit: { adminRpm: 100 } } as unknown as AppConfig, { logger: createLogger('silent') });
    const as = (keyId: string): Principal => ({ keyId, keyPrefix: 'gh-x', userId: 'u', departmentId: 'd', role: 'user', cacheScope: 'user', expiresAt: undefined });
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true); // t = 0: user 1 of 2
    clock.advance(30_000);
    expect((await limiter.admit(as('k1'), 'api')).allowed).toBe(true); // t = 30 s: key k1 full until 90 s
    clock.advance(31_000);
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true); // t = 61 s: user's window restarts
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true); // user full until 121 s
    clock.advance(1000);
    const refused = await limiter.admit(as('k1'), 'api'); // t = 62 s: both full
    expect(refused.allowed).toBe(false);
    expect(refused.error).toMatchObject({ param: 'user' });
    expect(refused.headers).toMatchObject({ 'x-ratelimit-limit-requests': '2', 'x-ratelimit-remaining-requests': '0' });
    expect(refused.headers['x-ratelimit-reset-requests']).toBe(`${refused.headers['retry-after']}s`);
  });
});

describe('RateLimiter: two counters of a kind with none left', () => {
  const setup = (limits: Record<string, Limit>) => {
    const clock = new ManualClock(Date.parse('2026-03-01T10:00:00Z'));
    const overrides = {
      get: (scope: string, id: string) => limits[`${scope}:${id}`],
      defaults: () => ({ requestsPerMinute: 1000, tokensPerMinute: undefined }),
    } as unknown as RateLimitOverrides;
    const limiter = new RateLimiter(new MemoryRateLimitStore(clock), overrides, { rateLimit: { adminRpm: 100 } } as unknown as AppConfig, { logger: createLogger('silent') });
    const as = (keyId: string): Principal => ({ keyId, keyPrefix: 'gh-x', userId: 'u', departmentId: 'd', role: 'user', cacheScope: 'user', expiresAt: undefined });
    return { clock, limiter, as };
  };

  // Before, the smaller limit won the tie: the key's, which resets sooner, and a client that
  // waited for it was refused by the user's.
  it('names the one that resets last in the reset header of an admitted request, and waiting it out is admitted', async () => {
    const { clock, limiter, as } = setup({
      'key:k1': { requestsPerMinute: 2, tokensPerMinute: undefined },
      'user:u': { requestsPerMinute: 3, tokensPerMinute: undefined },
    });
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true); // t = 0: user window until 60 s
    clock.advance(30_000);
    expect((await limiter.admit(as('k1'), 'api')).allowed).toBe(true); // t = 30 s: key window until 90 s
    clock.advance(31_000);
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true); // t = 61 s: user window until 121 s
    expect((await limiter.admit(as('k2'), 'api')).allowed).toBe(true);
    clock.advance(19_000);
    const last = await limiter.admit(as('k1'), 'api'); // t = 80 s: key 2/2 until 90 s, user 3/3 until 121 s
    expect(last.allowed).toBe(true);
    expect(last.headers).toMatchObject({ 'x-ratelimit-limit-requests': '3', 'x-ratelimit-remaining-requests': '0', 'x-ratelimit-reset-requests': '41s' });
    clock.advance(41_000);
    expect((await limiter.admit(as('k1'), 'api')).allowed).toBe(true);
  });

  it('does the same for the tokens trio, as the refusal does for the kind that refused', async () => {
    const { clock, limiter, as } = setup({
      'key:k1': { requestsPerMinute: 1, tokensPerMinute: 10 },
      'user:u': { requestsPerMinute: 1000, tokensPerMinute: 8 },
    });
    expect((await limiter.admit(as('k2'), 'api', true)).allowed).toBe(true);
    limiter.recordTokens(as('k2'), 5); // t = 0: user tokens until 60 s
    clock.advance(30_000);
    expect((await limiter.admit(as('k1'), 'api', true)).allowed).toBe(true);
    limiter.recordTokens(as('k1'), 10); // t = 30 s: key tokens full until 90 s, user's full until 60 s
    await new Promise((resolve) => setImmediate(resolve));
    clock.advance(10_000);
    const refused = await limiter.admit(as('k1'), 'api', true); // t = 40 s: refused by the key's request counter, until 90 s
    expect(refused.allowed).toBe(false);
    expect(refused.headers).toMatchObject({ 'retry-after': '50', 'x-ratelimit-limit-tokens': '10', 'x-ratelimit-remaining-tokens': '0', 'x-ratelimit-reset-tokens': '50s' });
  });
});
