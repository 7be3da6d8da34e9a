import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type Clock, ManualClock, SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { MemoryRateLimitStore } from '../../src/rate-limit/memory-rate-limit.store.js';
import type { Bucket } from '../../src/rate-limit/rate-limit.store.js';
import { leaseSize, RedisRateLimitStore } from '../../src/rate-limit/redis-rate-limit.store.js';
import { rateLimitStoreContract } from '../../src/rate-limit/testing/rate-limit-store.contract.js';
import { dropRedisPrefix, openTestRedis, uniqueRedisPrefix } from '../support/redis.js';

rateLimitStoreContract('memory', () => Promise.resolve({ store: new MemoryRateLimitStore(new SystemClock()), close: () => Promise.resolve() }));

// The real Redis on this machine; every test gets its own key prefix.
let prefix = '';
const redisStore = async (fresh: boolean, leasePercent = 0, maxCounters?: number, clock: Clock = new SystemClock()) => {
  if (fresh) prefix = uniqueRedisPrefix('rl');
  const connections = await openTestRedis(prefix);
  const lease = leasePercent > 0 ? { percent: leasePercent, clock, maxCounters } : undefined;
  return {
    store: new RedisRateLimitStore(connections.shared(), prefix, new MemoryRateLimitStore(new SystemClock()), createLogger('silent'), lease),
    counter: async (key: string) => Number((await connections.shared().call('GET', `${prefix}rl:${key}`)) ?? 0),
    drop: (key: string) => connections.shared().call('DEL', `${prefix}rl:${key}`),
    close: async () => {
      if (fresh) await dropRedisPrefix(connections);
      await connections.onApplicationShutdown();
    },
  };
};
rateLimitStoreContract('redis', () => redisStore(true), { second: () => redisStore(false) });
// And with leases at the default share: the contract's counters of 100 and more are leased.
rateLimitStoreContract('redis, leased', () => redisStore(true, 2), { second: () => redisStore(false, 2) });

describe('RedisRateLimitStore leases (real Redis)', () => {
  const req = (key: string, limit: number, windowMs = 60_000): Bucket => ({ key, limit, windowMs, cost: 1 });
  let subject: Awaited<ReturnType<typeof redisStore>>;
  beforeEach(async () => {
    subject = await redisStore(true, 2);
  });
  afterEach(async () => {
    await subject.close();
  });

  it('counts a lease in Redis with the request that asks, then admits from it without asking', async () => {
    const size = leaseSize(1000, 2);
    expect(size).toBe(20);
    const first = await subject.store.hit([req('k:l', 1000)]);
    expect(first.states[0]?.used).toBe(1);
    expect(await subject.counter('k:l')).toBe(1 + size);
    for (let i = 2; i <= 1 + size; i++) {
      const r = await subject.store.hit([req('k:l', 1000)]);
      expect(r.allowed).toBe(true);
      expect(r.states[0]?.used).toBe(i);
    }
    // The lease paid for all of those: Redis never heard of them.
    expect(await subject.counter('k:l')).toBe(1 + size);
    // Spent: the next request asks again, and takes the next lease.
    const next = await subject.store.hit([req('k:l', 1000)]);
    expect(next.states[0]?.used).toBe(2 + size);
    expect(await subject.counter('k:l')).toBe(2 + 2 * size);
  });

  it('never lets two leasing instances admit more than the limit together', async () => {
    const other = await redisStore(false, 10);
    const mine = await redisStore(false, 10);
    try {
      let allowed = 0;
      // Waves of concurrent requests spread over both instances, well past the limit.
      for (let wave = 0; wave < 15; wave++) {
        const results = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? mine : other).store.hit([req('k:two', 100)])));
        allowed += results.filter((r) => r.allowed).length;
      }
      expect(allowed).toBeLessThanOrEqual(100);
      // What is lost is at most one lease per instance, granted and never admitted.
      expect(allowed).toBeGreaterThanOrEqual(100 - 2 * leaseSize(100, 10));
      expect(await subject.counter('k:two')).toBeLessThanOrEqual(100);
    } finally {
      await other.close();
      await mine.close();
    }
  });

  it('never leases more than a quarter of what the window has left', async () => {
    const generous = await redisStore(false, 50);
    try {
      // 50% of 100 would be 50; a quarter of the 99 left after this request is 24.
      await generous.store.hit([req('k:q', 100)]);
      expect(await generous.counter('k:q')).toBe(1 + 24);
      // 24 admitted from the lease, then the next asks: a quarter of the 74 left after it.
      for (let i = 0; i < 24; i++) await generous.store.hit([req('k:q', 100)]);
      expect(await generous.counter('k:q')).toBe(25);
      const next = await generous.store.hit([req('k:q', 100)]);
      expect(next.states[0]?.used).toBe(26);
      expect(await generous.counter('k:q')).toBe(26 + 18);
    } finally {
      await generous.close();
    }
  });

  it('holds leases of a bounded number of counters: the oldest lease goes first', async () => {
    const small = await redisStore(false, 2, 3);
    try {
      for (const key of ['k:s1', 'k:s2', 'k:s3', 'k:s4']) await small.store.hit([req(key, 1000)]);
      // k:s2's lease is still held: admitted without asking. k:s1's was dropped for k:s4's: it asks.
      await small.store.hit([req('k:s2', 1000)]);
      expect(await small.counter('k:s2')).toBe(21);
      await small.store.hit([req('k:s1', 1000)]);
      expect(await small.counter('k:s1')).toBe(42);
    } finally {
      await small.close();
    }
  });

  it('asks Redis again when the limit changes (an admin override), and when the window ends', async () => {
    expect((await subject.store.hit([req('k:o', 1000)])).allowed).toBe(true);
    expect(await subject.counter('k:o')).toBe(21);
    // 21 were counted (1 + a lease of 20). Under a limit of 5 the lease is void, and its 20 unspent
    // requests are taken off the counter: one request was made, so four more are admitted, no more.
    const lowered = await subject.store.hit([req('k:o', 5)]);
    expect(lowered.allowed).toBe(true);
    expect(lowered.states[0]).toMatchObject({ used: 2, blocked: false });
    for (let i = 0; i < 3; i++) expect((await subject.store.hit([req('k:o', 5)])).allowed).toBe(true);
    expect(await subject.store.hit([req('k:o', 5)])).toMatchObject({ allowed: false, states: [{ used: 5, blocked: true }] });
    expect(await subject.counter('k:o')).toBe(5);
    // Raised again: nothing was leased under 5 (too small to lease), so nothing is given back twice.
    const raised = await subject.store.hit([req('k:o', 1000)]);
    expect(raised.states[0]?.used).toBe(6);

    expect((await subject.store.hit([req('k:win', 1000, 150)])).allowed).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 250));
    const renewed = await subject.store.hit([req('k:win', 1000, 150)]);
    expect(renewed.states[0]?.used).toBe(1);
  });

  it('gives a voided lease back only to the window it was counted in, not to a counter Redis began again', async () => {
    const clock = new ManualClock(Date.now());
    const a = await redisStore(false, 2, undefined, clock);
    const b = await redisStore(false, 2);
    try {
      // Instance a: one request and a lease of 20 under a limit of 1000, then 10 s of its window pass.
      expect((await a.store.hit([req('k:lost', 1000)])).allowed).toBe(true);
      clock.advance(10_000);
      // Redis loses the counter (a restart without persistence); the limit is lowered to 30, and
      // instance b admits 25 requests in the counter's new window.
      await a.drop('k:lost');
      let admitted = 0;
      for (let i = 0; i < 25; i++) if ((await b.store.hit([req('k:lost', 30)])).allowed) admitted++;
      // a's next request voids its lease: its 20 belong to a window that is gone, not to this one.
      for (let i = 0; i < 30; i++) if ((await a.store.hit([req('k:lost', 30)])).allowed) admitted++;
      expect(admitted).toBe(30);
    } finally {
      await a.close();
      await b.close();
    }
  });
});
