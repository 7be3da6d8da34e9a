import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { RateLimitStore } from '../rate-limit.store.js';

export interface StoreUnderTest {
  store: RateLimitStore;
  close(): Promise<void>;
}

/**
 * The behaviour every RateLimitStore driver must have, run against memory and the real Redis
 * (each test with its own key prefix). `second` (Redis only) is another instance on the same store.
 */
export function rateLimitStoreContract(name: string, make: () => Promise<StoreUnderTest>, more: { second?: () => Promise<StoreUnderTest> } = {}): void {
  describe(`RateLimitStore contract: ${name}`, () => {
    let subject: StoreUnderTest;
    let store: RateLimitStore;
    const req = (key: string, limit: number, windowMs = 60_000) => ({ key, limit, windowMs, cost: 1 });

    beforeEach(async () => {
      subject = await make();
      store = subject.store;
    });
    afterEach(async () => {
      await subject.close();
    });

    it('counts requests up to the limit, then refuses without counting the refusal', async () => {
      for (let i = 1; i <= 3; i++) {
        const r = await store.hit([req('k:a', 3)]);
        expect(r.allowed).toBe(true);
        expect(r.states[0]?.used).toBe(i);
        expect(r.states[0]?.resetMs).toBeGreaterThan(0);
        expect(r.states[0]?.resetMs).toBeLessThanOrEqual(60_000);
      }
      const refused = await store.hit([req('k:a', 3)]);
      expect(refused.allowed).toBe(false);
      expect(refused.states[0]).toMatchObject({ used: 3, blocked: true });
      // A higher limit (an admin override) applies to the same counter at once.
      expect((await store.hit([req('k:a', 5)])).states[0]?.used).toBe(4);
    });

    it('is all-or-nothing across buckets: a refusal by one costs the others nothing', async () => {
      await store.hit([req('d:full', 1)]);
      const r = await store.hit([req('k:b', 10), req('u:b', 10), req('d:full', 1)]);
      expect(r.allowed).toBe(false);
      expect(r.states.map((s) => s.blocked)).toEqual([false, false, true]);
      const again = await store.hit([req('k:b', 10), req('u:b', 10)]);
      expect(again.states.map((s) => s.used)).toEqual([1, 1]);
    });

    it('checks token counters without counting, and refuses once add() reaches the limit', async () => {
      const tokens = { key: 'kt:c', limit: 100, windowMs: 60_000, cost: 0 };
      expect((await store.hit([req('k:c', 10), tokens])).allowed).toBe(true);
      await store.add(['kt:c'], 60, 60_000);
      const mid = await store.hit([req('k:c', 10), tokens]);
      expect(mid.allowed).toBe(true);
      expect(mid.states[1]?.used).toBe(60);
      await store.add(['kt:c'], 45, 60_000);
      const over = await store.hit([req('k:c', 10), tokens]);
      expect(over.allowed).toBe(false);
      expect(over.states[1]).toMatchObject({ used: 105, blocked: true });
      expect(over.states[0]?.used).toBe(2);
    });

    it('starts a new window when the old one runs out', async () => {
      expect((await store.hit([req('k:w', 1, 200)])).allowed).toBe(true);
      expect((await store.hit([req('k:w', 1, 200)])).allowed).toBe(false);
      const deadline = Date.now() + 5000;
      for (;;) {
        const r = await store.hit([req('k:w', 1, 200)]);
        if (r.allowed) {
          expect(r.states[0]?.used).toBe(1);
          break;
        }
        expect(r.states[0]?.resetMs).toBeLessThanOrEqual(200);
        if (Date.now() > deadline) throw new Error('window never reset');
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    });

    it('never lets concurrent requests overshoot the limit', async () => {
      const results = await Promise.all(Array.from({ length: 50 }, () => store.hit([req('k:race', 10), req('u:race', 1000)])));
      expect(results.filter((r) => r.allowed)).toHaveLength(10);
      expect(
        results
          .filter((r) => r.allowed)
          .map((r) => r.states[0]?.used)
          .sort((a, b) => (a ?? 0) - (b ?? 0)),
      ).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      const user = await store.hit([req('u:race', 1000)]);
      expect(user.states[0]?.used).toBe(11);
    });

    it('works as a @nestjs/throttler ThrottlerStorage', async () => {
      const first = await store.increment('tracker', 60_000, 2, 60_000, 'default');
      expect(first).toMatchObject({ totalHits: 1, isBlocked: false, timeToBlockExpire: 0 });
      await store.increment('tracker', 60_000, 2, 60_000, 'default');
      const third = await store.increment('tracker', 60_000, 2, 60_000, 'default');
      expect(third.isBlocked).toBe(true);
      expect(third.timeToBlockExpire).toBeGreaterThan(0);
    });

    it('reports itself up', () => {
      expect(store.describe().state).toBe('up');
    });

    if (more.second) {
      const makeSecond = more.second;
      it('holds one limit across two instances hit concurrently', async () => {
        const other = await makeSecond();
        try {
          const results = await Promise.all(Array.from({ length: 30 }, (_, i) => (i % 2 === 0 ? store : other.store).hit([req('k:shared', 10)])));
          expect(results.filter((r) => r.allowed)).toHaveLength(10);
        } finally {
          await other.close();
        }
      });
    }
  });
}
