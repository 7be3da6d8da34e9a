import { SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { MemoryRateLimitStore } from '../../src/rate-limit/memory-rate-limit.store.js';
import { RedisRateLimitStore } from '../../src/rate-limit/redis-rate-limit.store.js';
import { rateLimitStoreContract } from '../../src/rate-limit/testing/rate-limit-store.contract.js';
import { dropRedisPrefix, openTestRedis, uniqueRedisPrefix } from '../support/redis.js';

rateLimitStoreContract('memory', () => Promise.resolve({ store: new MemoryRateLimitStore(new SystemClock()), close: () => Promise.resolve() }));

// The real Redis on this machine; every test gets its own key prefix.
let prefix = '';
const redisStore = async (fresh: boolean) => {
  if (fresh) prefix = uniqueRedisPrefix('rl');
  const connections = await openTestRedis(prefix);
  return {
    store: new RedisRateLimitStore(connections.shared(), prefix, new MemoryRateLimitStore(new SystemClock()), createLogger('silent')),
    close: async () => {
      if (fresh) await dropRedisPrefix(connections);
      await connections.onApplicationShutdown();
    },
  };
};
rateLimitStoreContract('redis', () => redisStore(true), { second: () => redisStore(false) });
