import { afterEach, describe, expect, it } from 'vitest';
import { NEAR_FLUSH, RedisResponseCache } from '../../src/cache/redis-response-cache.js';
import { SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { type RedisConnections, whenReady } from '../../src/redis/redis-connections.js';
import { REDIS_URL } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';
import { dropRedisPrefix, openTestRedis, sentCommandsRan, startRedisProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const tags = { userId: 'user-1', departmentId: 'dept-1', models: ['model-1'] };

/**
 * Near copies of the Redis cache, on the real Redis: instances wired as the cache module wires
 * them (their own connections and subscriber, one key prefix). What a near copy changes is only
 * visible by taking the entry out of Redis behind the cache's back, with a raw DEL that no
 * instance hears of: a lookup that still hits was answered near, without asking Redis.
 */
describe('RedisResponseCache near copies (real Redis)', () => {
  const opened: RedisConnections[] = [];
  const proxies: TcpProxy[] = [];
  afterEach(async () => {
    if (opened[0]) await dropRedisPrefix(opened[0]);
    for (const c of opened.splice(0)) await c.onApplicationShutdown();
    for (const p of proxies.splice(0)) await p.stop();
  });

  async function instance(prefix: string, options: { maxAgeMs?: number; url?: string } = {}) {
    const connections = await openTestRedis(prefix, options.url);
    opened.push(connections);
    const near = { clock: new SystemClock(), maxAgeMs: options.maxAgeMs ?? 10_000, maxEntries: 100, maxChars: 1 << 20 };
    const store = new RedisResponseCache(connections.shared(), prefix, createLogger('silent'), near);
    const listener = connections.subscriber(store.landedChannel, (key) => store.landed(key), 'test-near');
    store.listenWith(listener);
    await whenReady(listener, 5000);
    return { store, listener, connections };
  }

  /** Takes the entry out of Redis without a delete anyone hears of. */
  async function dropBehindTheBack(prefix: string, key: string): Promise<void> {
    const raw = await openTestRedis(prefix);
    try {
      expect(await raw.shared().call('DEL', `${prefix}cache:e:${key}`)).toBe(1);
    } finally {
      await raw.onApplicationShutdown();
    }
  }

  it('answers a hit near, without asking Redis, for at most its near lifetime', async () => {
    const prefix = uniqueRedisPrefix('near');
    const a = await instance(prefix, { maxAgeMs: 400 });
    const b = await instance(prefix, { maxAgeMs: 400 });
    await a.store.store('k1', 'body-1', 60_000, tags);
    await sentCommandsRan(a.connections);
    // B reads it from Redis once, and keeps it near.
    expect(await b.store.lookup('k1', 0)).toEqual({ kind: 'hit', body: 'body-1' });
    await dropBehindTheBack(prefix, 'k1');
    expect(await a.store.lookup('k1', 0)).toEqual({ kind: 'hit', body: 'body-1' });
    expect(await b.store.lookup('k1', 0)).toEqual({ kind: 'hit', body: 'body-1' });
    // Past the near lifetime both ask Redis again, which has nothing.
    await sleep(450);
    expect(await a.store.lookup('k1', 0)).toEqual({ kind: 'miss' });
    expect(await b.store.lookup('k1', 0)).toEqual({ kind: 'miss' });
  });

  it('never keeps a copy past the entry’s own TTL', async () => {
    const prefix = uniqueRedisPrefix('near');
    const a = await instance(prefix);
    await a.store.store('k-ttl', 'short', 200, tags);
    expect(await a.store.lookup('k-ttl', 0)).toEqual({ kind: 'hit', body: 'short' });
    await sleep(300);
    expect(await a.store.lookup('k-ttl', 0)).toEqual({ kind: 'miss' });
  });

  it('drops the near copies of every instance when one of them deletes', async () => {
    const prefix = uniqueRedisPrefix('near');
    const a = await instance(prefix);
    const b = await instance(prefix);
    await a.store.store('k2', 'body-2', 60_000, tags);
    await sentCommandsRan(a.connections);
    expect(await b.store.lookup('k2', 0)).toEqual({ kind: 'hit', body: 'body-2' });
    expect(await a.store.invalidate({ userId: 'user-1' })).toBe(1);
    // Both copies live for 10 s; B drops its own once it hears of the delete.
    await pollUntil(async () => expect(await b.store.lookup('k2', 0)).toEqual({ kind: 'miss' }), 2000, 10);
    expect(await a.store.lookup('k2', 0)).toEqual({ kind: 'miss' });
  });

  it('keeps no copy of a read that was on its way while a delete was heard: Redis may have read the entry before the delete', async () => {
    const prefix = uniqueRedisPrefix('near');
    const b = await instance(prefix);
    const a = await instance(prefix);
    await a.store.store('k-race', 'before-delete', 60_000, tags);
    await sentCommandsRan(a.connections);
    // B's read is on its way when the flush of another instance's delete reaches B: the order
    // the two connections deliver in is not fixed, and the read ran in Redis first.
    const read = b.store.lookup('k-race', 0);
    b.store.landed(NEAR_FLUSH);
    expect(await read).toEqual({ kind: 'hit', body: 'before-delete' });
    await dropBehindTheBack(prefix, 'k-race');
    // Had B kept what that read brought, it would answer the deleted entry for its near lifetime.
    expect(await b.store.lookup('k-race', 0)).toEqual({ kind: 'miss' });
  });

  it('drops its near copies when its subscriber connection drops, since a delete may go unheard', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    proxies.push(proxy);
    const prefix = uniqueRedisPrefix('near');
    const a = await instance(prefix, { url: proxy.url });
    const direct = await instance(prefix);
    await a.store.store('k3', 'body-3', 60_000, tags);
    await sentCommandsRan(a.connections);
    expect(await direct.store.peek('k3')).toEqual({ kind: 'hit', body: 'body-3' });
    await proxy.stop();
    await pollUntil(() => expect(a.listener.status).not.toBe('ready'), 5000, 10);
    // Deleted while this instance could not hear it.
    await dropBehindTheBack(prefix, 'k3');
    await proxy.start();
    await whenReady(a.listener, 5000);
    await pollUntil(() => expect(a.connections.shared().status).toBe('ready'), 5000, 10);
    expect(await a.store.lookup('k3', 0)).toEqual({ kind: 'miss' });
  });
});
