import { randomUUID } from 'node:crypto';
import { pollUntil } from '../../core/testing/poll-until.js';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { ResponseCache, CacheTags } from '../response-cache.js';

export interface CacheUnderTest {
  cache: ResponseCache;
  close(): Promise<void>;
}

/**
 * The behaviour every ResponseCache driver must have. Run by test/integration against the
 * memory driver and the real Redis (each test on its own key prefix). Time is real: expiry is
 * checked with short TTLs and polling, never a fixed sleep.
 */
export function responseCacheContract(name: string, make: () => Promise<CacheUnderTest>, more: { second?: () => Promise<CacheUnderTest> } = {}): void {
  describe(`ResponseCache contract: ${name}`, () => {
    let subject: CacheUnderTest;
    let cache: ResponseCache;
    const tags = (over: Partial<CacheTags> = {}): CacheTags => ({ userId: randomUUID(), departmentId: randomUUID(), models: ['openai/gpt-4o-mini'], ...over });

    beforeEach(async () => {
      subject = await make();
      cache = subject.cache;
    });
    afterEach(async () => {
      await subject.close();
    });

    it('misses, stores, then hits with the exact body (unicode included)', async () => {
      expect(await cache.lookup('k1', 0)).toEqual({ kind: 'miss' });
      const body = JSON.stringify({ id: 'c1', choices: [{ message: { content: 'héllo → 世界 🎉' } }] });
      await cache.store('k1', body, 60_000, tags());
      expect(await cache.lookup('k1', 0)).toEqual({ kind: 'hit', body });
      expect(await cache.lookup('k1', 5000)).toEqual({ kind: 'hit', body });
      expect(await cache.peek('k1')).toEqual({ kind: 'hit', body });
    });

    it('elects exactly one leader among concurrent lookups; the others wait until it stores', async () => {
      const results = await Promise.all(Array.from({ length: 20 }, () => cache.lookup('k2', 5000)));
      const leaders = results.filter((r) => r.kind === 'lead');
      expect(leaders).toHaveLength(1);
      expect(results.filter((r) => r.kind === 'wait')).toHaveLength(19);
      expect(await cache.peek('k2')).toEqual({ kind: 'wait' });
      const token = (leaders[0] as { token: string }).token;
      await cache.store('k2', '{"ok":true}', 60_000, tags(), token);
      expect(await cache.peek('k2')).toEqual({ kind: 'hit', body: '{"ok":true}' });
    });

    it('releases a lock only for the token that holds it (compare-and-delete)', async () => {
      const lead = await cache.lookup('k3', 5000);
      expect(lead.kind).toBe('lead');
      expect(await cache.release('k3', 'not-the-token')).toBe(false);
      expect(await cache.peek('k3')).toEqual({ kind: 'wait' });
      expect(await cache.release('k3', (lead as { token: string }).token)).toBe(true);
      expect(await cache.peek('k3')).toEqual({ kind: 'free' });
      expect((await cache.lookup('k3', 5000)).kind).toBe('lead');
    });

    it("a leader whose lock expired cannot free its successor's lock", async () => {
      const first = await cache.lookup('k4', 150);
      expect(first.kind).toBe('lead');
      const second = await pollUntil(async () => {
        const r = await cache.lookup('k4', 5000);
        if (r.kind !== 'lead') throw new Error(`still ${r.kind}`);
        return r;
      });
      expect(await cache.release('k4', (first as { token: string }).token)).toBe(false);
      // A late store by the first leader keeps its answer but leaves the successor's lock alone.
      await cache.store('k4', '{"late":1}', 60_000, tags(), (first as { token: string }).token);
      expect(await cache.release('k4', second.token)).toBe(true);
    });

    it('expires entries after their TTL', async () => {
      await cache.store('k5', '{"short":1}', 200, tags());
      expect((await cache.lookup('k5', 0)).kind).toBe('hit');
      await pollUntil(async () => {
        const r = await cache.lookup('k5', 0);
        if (r.kind !== 'miss') throw new Error('not expired yet');
      });
    });

    it('invalidates by user, department, model (combinable), and everything', async () => {
      const alice = tags({ userId: randomUUID(), departmentId: 'd-1' });
      const bob = { ...tags(), userId: randomUUID(), departmentId: alice.departmentId, models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'] };
      const carol = tags();
      await cache.store('a1', '{"a":1}', 60_000, alice);
      await cache.store('a2', '{"a":2}', 60_000, { ...alice, models: ['meta-llama/llama-3.1-8b-instruct'] });
      await cache.store('b1', '{"b":1}', 60_000, bob);
      await cache.store('c1', '{"c":1}', 60_000, carol);

      expect(await cache.invalidate({ userId: alice.userId, model: 'meta-llama/llama-3.1-8b-instruct' })).toBe(1);
      expect((await cache.lookup('a2', 0)).kind).toBe('miss');
      expect((await cache.lookup('a1', 0)).kind).toBe('hit');

      expect(await cache.invalidate({ model: 'anthropic/claude-3.5-sonnet' })).toBe(1);
      expect((await cache.lookup('b1', 0)).kind).toBe('miss');

      await cache.store('b1', '{"b":1}', 60_000, bob);
      expect(await cache.invalidate({ departmentId: alice.departmentId })).toBe(2);
      expect((await cache.lookup('a1', 0)).kind).toBe('miss');
      expect((await cache.lookup('c1', 0)).kind).toBe('hit');

      expect(await cache.invalidate({ userId: randomUUID() })).toBe(0);
      expect(await cache.invalidate({})).toBe(1);
      expect((await cache.lookup('c1', 0)).kind).toBe('miss');
    });

    it('counts only the live entries a delete removes, not those already expired', async () => {
      const owner = tags();
      await cache.store('x1', '{"x":1}', 100, owner);
      await cache.store('x2', '{"x":2}', 60_000, owner);
      // Stored after x1 with the same TTL: once it is gone, so is x1, which nothing has read since.
      await cache.store('x3', '{"x":3}', 100, tags());
      await pollUntil(async () => {
        if ((await cache.lookup('x3', 0)).kind !== 'miss') throw new Error('not expired yet');
      });
      expect(await cache.invalidate({ userId: owner.userId })).toBe(1);
      expect(await cache.invalidate({ departmentId: owner.departmentId })).toBe(0);
    });

    it('a delete by user, department or model spares an entry someone else has filled since, whatever its index said', async () => {
      const first = tags({ models: ['openai/gpt-4o-mini', 'anthropic/claude-3.5-sonnet'] });
      const second = tags({ models: ['openai/gpt-4o-mini'] });
      // Overwritten while live (cache-control: no-cache by another user of a shared department).
      await cache.store('o1', '{"by":"first"}', 60_000, first);
      await cache.store('o1', '{"by":"second"}', 60_000, second);
      // Refilled by another user after it expired.
      await cache.store('o2', '{"by":"first"}', 100, first);
      await pollUntil(async () => {
        if ((await cache.lookup('o2', 0)).kind !== 'miss') throw new Error('not expired yet');
      });
      await cache.store('o2', '{"by":"second"}', 60_000, second);

      expect(await cache.invalidate({ userId: first.userId })).toBe(0);
      expect(await cache.invalidate({ departmentId: first.departmentId })).toBe(0);
      expect(await cache.invalidate({ model: 'anthropic/claude-3.5-sonnet' })).toBe(0);
      expect(await cache.lookup('o1', 0)).toEqual({ kind: 'hit', body: '{"by":"second"}' });
      expect(await cache.lookup('o2', 0)).toEqual({ kind: 'hit', body: '{"by":"second"}' });
      // Still found under its owner, once.
      expect(await cache.invalidate({ userId: second.userId, model: 'openai/gpt-4o-mini' })).toBe(2);
      expect((await cache.lookup('o1', 0)).kind).toBe('miss');
      expect(await cache.invalidate({ userId: second.userId })).toBe(0);
    });

    it('reports itself available and up', () => {
      expect(cache.available()).toBe(true);
      expect(cache.describe().state).toBe('up');
    });

    if (more.second) {
      const makeSecond = more.second;
      it('shares entries and locks with another instance on the same store', async () => {
        const other = await makeSecond();
        try {
          const [a, b] = await Promise.all([cache.lookup('x1', 5000), other.cache.lookup('x1', 5000)]);
          expect([a.kind, b.kind].sort()).toEqual(['lead', 'wait']);
          const [leader, follower] = a.kind === 'lead' ? [{ c: cache, t: a.token }, other.cache] : [{ c: other.cache, t: (b as { token: string }).token }, cache];
          // Until the fill lands the other instance is told to wait, never that the key is free.
          expect(await follower.peek('x1')).toEqual({ kind: 'wait' });
          await leader.c.store('x1', '{"shared":true}', 60_000, tags(), leader.t);
          // A fill may be sent without waiting for Redis's reply, so store() resolving does not
          // mean it has run. The leader's next command on the same connection runs after it;
          // from then on every instance sees the entry (a real waiter hears it land instead).
          expect(await leader.c.peek('x1')).toEqual({ kind: 'hit', body: '{"shared":true}' });
          expect(await follower.peek('x1')).toEqual({ kind: 'hit', body: '{"shared":true}' });
        } finally {
          await other.close();
        }
      });
    }
  });
}
