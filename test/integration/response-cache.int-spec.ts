import { SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { MemoryResponseCache } from '../../src/cache/memory-response-cache.js';
import { RedisResponseCache } from '../../src/cache/redis-response-cache.js';
import { responseCacheContract } from '../../src/cache/testing/response-cache.contract.js';
import { dropRedisPrefix, openTestRedis, uniqueRedisPrefix } from '../support/redis.js';

responseCacheContract('memory', () =>
  Promise.resolve({ cache: new MemoryResponseCache(new SystemClock(), 1000, 1024 * 1024), close: () => Promise.resolve() }),
);

// The real Redis on this machine; every test gets its own key prefix.
let prefix = '';
const redisCache = async (fresh: boolean) => {
  if (fresh) prefix = uniqueRedisPrefix('cache');
  const connections = await openTestRedis(prefix);
  return {
    cache: new RedisResponseCache(connections.shared(), prefix, createLogger('silent')),
    close: async () => {
      if (fresh) await dropRedisPrefix(connections);
      await connections.onApplicationShutdown();
    },
  };
};
responseCacheContract('redis', () => redisCache(true), { second: () => redisCache(false) });
