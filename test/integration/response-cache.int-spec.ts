import { describe, expect, it } from 'vitest';
import { SystemClock } from '../../src/core/clock.js';
import { pollUntil } from '../../src/core/testing/poll-until.js';
import { createLogger } from '../../src/core/logger.js';
import { MemoryResponseCache } from '../../src/cache/memory-response-cache.js';
import { RedisResponseCache } from '../../src/cache/redis-response-cache.js';
import { responseCacheContract } from '../../src/cache/testing/response-cache.contract.js';
import { whenReady } from '../../src/redis/redis-connections.js';
import { dropRedisPrefix, openTestRedis, uniqueRedisPrefix } from '../support/redis.js';

responseCacheContract('memory', () =>
  Promise.resolve({ cache: new MemoryResponseCache(new SystemClock(), 1000, 1024 * 1024), close: () => Promise.resolve() }),
);

// The real Redis on this machine; every test gets its own key prefix.
let prefix = '';
const redisCache = async (fresh: boolean, near = false) => {
  if (fresh) prefix = uniqueRedisPrefix('cache');
  const connections = await openTestRedis(prefix);
  const cache = new RedisResponseCache(
    connections.shared(),
    prefix,
    createLogger('silent'),
    near ? { clock: new SystemClock(), maxAgeMs: 10_000, maxEntries: 100, maxChars: 1 << 20 } : undefined,
  );
  if (near) {
    const listener = connections.subscriber(cache.landedChannel, (key) => cache.landed(key), 'test-near');
    cache.listenWith(listener);
    await whenReady(listener, 5000);
  }
  return {
    cache,
    close: async () => {
      if (fresh) await dropRedisPrefix(connections);
      await connections.onApplicationShutdown();
    },
  };
};
responseCacheContract('redis', () => redisCache(true), { second: () => redisCache(false) });
// And with near copies, as the cache module wires it by default (CACHE_NEAR_SECONDS).
responseCacheContract('redis, near copies', () => redisCache(true, true), { second: () => redisCache(false, true) });

describe('RedisResponseCache indexes (real Redis)', () => {
  it('hold only live entries: a fill drops the expired ones, so a busy model does not collect every key it ever cached', async () => {
    const { cache, close } = await redisCache(true);
    const raw = await openTestRedis(prefix);
    try {
      const tags = { userId: 'user-busy', departmentId: 'dept-busy', models: ['openai/gpt-4o-mini'] };
      // A long-lived entry keeps the indexes alive while short-lived ones come and go.
      await cache.store('long-1', '{"k":"long-1"}', 60_000, tags);
      const keys = Array.from({ length: 20 }, (_, i) => `short-${i}`);
      for (const key of keys) await cache.store(key, `{"k":"${key}"}`, 50, tags);
      await pollUntil(async () => {
        for (const key of keys) if ((await cache.lookup(key, 0)).kind !== 'miss') throw new Error(`${key} not expired yet`);
      });
      await cache.store('long-2', '{"k":"long-2"}', 60_000, tags);
      // Sent without waiting for a reply; a command after it on the same connection runs after it.
      expect((await cache.peek('long-2')).kind).toBe('hit');

      // Every index key under the prefix, whatever its kind, with its member count.
      const sizes: Record<string, number> = {};
      let cursor = '0';
      do {
        const [next, found] = (await raw.shared().call('SCAN', cursor, 'MATCH', `${prefix}cache:*`, 'COUNT', 1000)) as [string, string[]];
        cursor = next;
        for (const key of found) {
          const type = (await raw.shared().call('TYPE', key)) as string;
          if (type === 'set') sizes[key] = (await raw.shared().call('SCARD', key)) as number;
          if (type === 'zset') sizes[key] = (await raw.shared().call('ZCARD', key)) as number;
        }
      } while (cursor !== '0');
      // One index per user, department and model, each listing the two live entries only.
      expect(Object.values(sizes)).toEqual([2, 2, 2]);
      expect(await cache.invalidate({ model: 'openai/gpt-4o-mini' })).toBe(2);
    } finally {
      await raw.onApplicationShutdown();
      await close();
    }
  });
});
