import { afterEach, describe, expect, it } from 'vitest';
import type { CacheTicket } from '../../src/cache/completion-cache.service.js';
import { RedisResponseCache } from '../../src/cache/redis-response-cache.js';
import { testCall, testCompletion, testCompletionCache, testRoute as route } from '../../src/cache/testing/completion-cache.fixtures.js';
import { createLogger } from '../../src/core/logger.js';
import { whenReady } from '../../src/redis/redis-connections.js';
import type { RedisConnections } from '../../src/redis/redis-connections.js';
import { pollUntil } from '../support/gateway.js';
import { dropRedisPrefix, openTestRedis, sentCommandsRan, uniqueRedisPrefix } from '../support/redis.js';

const answer = testCompletion('landed');
const call = () => testCall('the same question on two instances');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/**
 * How long the leader works before it fills or gives up. A waiter looks after 10 ms, then naps
 * up to 500 ms unless the channel wakes it, or (unannounced) looks at ~10/30/70/150/250 ms. So the
 * fill must land inside that nap (510 ms; a loaded machine fires timers late) and after the
 * fourth unannounced look: 300 ms leaves ~200 ms of slack one way and ~150 ms the other.
 */
const LEADER_WORKS_MS = 300;

/**
 * Two instances as the cache module wires them (each its own connections, one Redis, one key
 * prefix), and a count of the looks the second one takes at the entry while it waits.
 */
describe('singleflight across instances on Redis: waiters are told when the answer lands', () => {
  const opened: RedisConnections[] = [];
  afterEach(async () => {
    if (opened[0]) await dropRedisPrefix(opened[0]);
    for (const c of opened.splice(0)) await c.onApplicationShutdown();
  });

  async function instance(prefix: string, announced: boolean) {
    const connections = await openTestRedis(prefix);
    opened.push(connections);
    const store = new RedisResponseCache(connections.shared(), prefix, createLogger('silent'));
    if (announced) {
      const listener = connections.subscriber(store.landedChannel, (key) => store.landed(key), 'test-landed');
      store.listenWith(listener);
      await whenReady(listener, 5000);
    }
    let peeks = 0;
    const peek = store.peek.bind(store);
    store.peek = (key) => {
      peeks += 1;
      return peek(key);
    };
    // A wake is an announcement that cut a nap short. Without it the waiter still gets the
    // answer, one nap later and with the same number of looks, so the looks alone cannot tell.
    let wakes = 0;
    const watch = store.watch.bind(store);
    store.watch = (key) => {
      const watching = watch(key);
      void watching?.landed.then(() => (wakes += 1));
      return watching;
    };
    return { cache: testCompletionCache(store, 5000), store, peeks: () => peeks, wakes: () => wakes, connections };
  }

  it.each([
    ['with announcements, takes the answer when it lands: one early look and one after', true, 2],
    ['without them (subscriber down), still gets it by polling, with many more looks', false, 5],
  ])('%s', async (_name, announced, bound) => {
    const prefix = uniqueRedisPrefix('landed');
    const a = await instance(prefix, announced);
    const b = await instance(prefix, announced);
    const leader = await a.cache.open(call(), route);
    expect(leader.status).toBe('miss');
    const waiting = b.cache.open(call(), route);
    await sleep(LEADER_WORKS_MS);
    await leader.fill(JSON.stringify(answer), answer);
    const ticket = await waiting;
    expect(ticket.status).toBe('hit');
    expect(ticket.hit?.completion.choices[0]?.message.content).toBe('landed');
    if (announced) expect(b.peeks()).toBeLessThanOrEqual(bound);
    else expect(b.peeks()).toBeGreaterThanOrEqual(bound);
    expect(b.wakes()).toBe(announced ? 1 : 0);
  });

  it('announces a fill or a release on the channel only when another instance waits for it', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const connections = await openTestRedis(prefix);
    opened.push(connections);
    const store = new RedisResponseCache(connections.shared(), prefix, createLogger('silent'));
    const heard: string[] = [];
    await whenReady(connections.subscriber(store.landedChannel, (key) => heard.push(key), 'test-ear'), 5000);
    const tags = { userId: 'u', departmentId: 'd', models: ['m'] };

    // Nobody waits: the fill says nothing.
    const alone = await store.lookup('k-alone', 5000);
    if (alone.kind !== 'lead') throw new Error(`expected to lead, got ${alone.kind}`);
    await store.store('k-alone', 'body', 60_000, tags, alone.token);

    // Someone waits (a second lookup is told to): the fill is announced once, with its key.
    const lead = await store.lookup('k-waited', 5000);
    if (lead.kind !== 'lead') throw new Error(`expected to lead, got ${lead.kind}`);
    expect((await store.lookup('k-waited', 5000)).kind).toBe('wait');
    await store.store('k-waited', 'body', 60_000, tags, lead.token);

    // A leader that gives up while someone waits is announced too.
    const quitter = await store.lookup('k-released', 5000);
    if (quitter.kind !== 'lead') throw new Error(`expected to lead, got ${quitter.kind}`);
    expect((await store.peek('k-released')).kind).toBe('wait');
    expect(await store.release('k-released', quitter.token)).toBe(true);

    await pollUntil(() => expect(heard).toEqual(['k-waited', 'k-released']));
  });

  // A purge while the leader is with the upstream: its answer may be what the admin purged, so
  // it is stored nowhere, but the instance waiting for it still gets it instead of asking again.
  it('hands an answer a purge kept out of the cache to the instance waiting for it, and stores it nowhere', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const a = await instance(prefix, true);
    const b = await instance(prefix, true);
    const leader = await a.cache.open(call(), route);
    const waiting = b.cache.open(call(), route);
    await sleep(LEADER_WORKS_MS);
    await a.cache.invalidate({});
    await leader.fill(JSON.stringify(answer), answer);
    const ticket = await waiting;
    expect(ticket.status).toBe('hit');
    expect(ticket.hit?.completion.choices[0]?.message.content).toBe('landed');
    expect(b.wakes()).toBe(1);
    for (const cache of [a.cache, b.cache]) {
      const next = await cache.open(call(), route);
      expect(next.status).toBe('miss');
      next.abandon();
    }
  });

  it('does not store a fill that was in flight when another instance purged', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const a = await instance(prefix, true);
    const b = await instance(prefix, true);
    let heard = 0;
    a.store.onPurge(() => (heard += 1));
    const leader = await a.cache.open(call(), route);
    await b.cache.invalidate({ userId: 'u' });
    // Announced before B's delete ran; A hears it on its own connection.
    await pollUntil(() => expect(heard).toBe(1));
    await leader.fill(JSON.stringify(answer), answer);
    await sentCommandsRan(a.connections);
    expect((await b.cache.open(call(), route)).status).toBe('miss');
  });

  it('writes a handed-over answer only when another instance waits for it', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const connections = await openTestRedis(prefix);
    opened.push(connections);
    const store = new RedisResponseCache(connections.shared(), prefix, createLogger('silent'));
    const alone = await store.lookup('k-alone', 5000);
    if (alone.kind !== 'lead') throw new Error(`expected to lead, got ${alone.kind}`);
    expect(await store.release('k-alone', alone.token, 'purged')).toBe(true);
    expect(await store.peek('k-alone')).toEqual({ kind: 'free' });

    const waited = await store.lookup('k-waited', 5000);
    if (waited.kind !== 'lead') throw new Error(`expected to lead, got ${waited.kind}`);
    expect((await store.lookup('k-waited', 5000)).kind).toBe('wait');
    expect(await store.release('k-waited', waited.token, 'purged')).toBe(true);
    expect(await store.peek('k-waited')).toEqual({ kind: 'hit', body: 'purged' });
    // Only waiters look there: a new caller finds no entry, and leads.
    expect((await store.lookup('k-waited', 5000)).kind).toBe('lead');
  });

  it('lets a waiter lead at once when the leader gives up', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const a = await instance(prefix, true);
    const b = await instance(prefix, true);
    const leader = await a.cache.open(call(), route);
    const waiting = b.cache.open(call(), route);
    await sleep(LEADER_WORKS_MS);
    leader.abandon();
    const ticket = await waiting;
    // B now fills for everyone: a miss it leads, after one early look and the announced one.
    expect(ticket.status).toBe('miss');
    expect(b.peeks()).toBeLessThanOrEqual(2);
    expect(b.wakes()).toBe(1);
    await ticket.fill(JSON.stringify(answer), answer);
    await sentCommandsRan(b.connections);
    expect((await a.cache.open(call(), route)).status).toBe('hit');
  });

  it('hands the lead, and the fill lock, to one waiting call of the same instance when the leader gives up', async () => {
    const prefix = uniqueRedisPrefix('landed');
    const a = await instance(prefix, true);
    const b = await instance(prefix, true);
    const leader = await a.cache.open(call(), route);
    const settled: CacheTicket[] = [];
    const followers = Array.from({ length: 3 }, () => a.cache.open(call(), route).then((t) => (settled.push(t), t)));
    leader.abandon();
    const next = await pollUntil(() => {
      expect(settled).toHaveLength(1);
      return settled[0];
    });
    expect(next.status).toBe('miss');
    // It holds the lock now: the other instance waits for its answer instead of leading too.
    const elsewhere = b.cache.open(call(), route);
    await sleep(LEADER_WORKS_MS);
    expect(settled).toHaveLength(1);
    await next.fill(JSON.stringify(answer), answer);
    const tickets = await Promise.all(followers);
    expect(tickets.filter((t) => t !== next).map((t) => t.status)).toEqual(['hit', 'hit']);
    expect((await elsewhere).status).toBe('hit');
  });
});
