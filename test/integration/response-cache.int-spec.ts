import { SystemClock } from '../../src/core/clock.js';
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
