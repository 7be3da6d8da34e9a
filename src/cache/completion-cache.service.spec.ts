import { afterEach, describe, expect, it, vi } from 'vitest';
import { SystemClock } from '../core/clock.js';
import type { CacheTicket } from './completion-cache.service.js';
import { encodeCacheEntry } from './cache-entry.js';
import { MemoryResponseCache } from './memory-response-cache.js';
import { assembleCompletion } from './stream-replay.js';
import type { CacheLookup, ResponseCache } from './response-cache.js';
import { testCall, testCompletion, testCompletionCache, testRoute as route } from './testing/completion-cache.fixtures.js';

const answer = testCompletion('hi');

function setup(waitMs = 5000, store = new MemoryResponseCache(new SystemClock(), 100, 100_000)) {
  const cache = testCompletionCache(store, waitMs);
  const call = (signal?: AbortSignal) => testCall('same', signal);
  return { cache, call, store };
}

describe('CompletionCache singleflight (in process)', () => {
  it('makes followers wait for the leader and hands them its answer', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    expect(leader.status).toBe('miss');
    const followers = Array.from({ length: 5 }, () => cache.open(call(), route));
    expect(cache.inFlight).toBe(1);
    await leader.fill(JSON.stringify(answer), answer);
    const tickets = await Promise.all(followers);
    expect(tickets.map((t) => t.status)).toEqual(Array(5).fill('hit'));
    expect(tickets[0]?.hit?.completion.choices[0]?.message.content).toBe('hi');
    expect(cache.inFlight).toBe(0);
  });

  it('hands the lead to one follower when the leader gives up; the others get its answer, not the upstream', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const settled: CacheTicket[] = [];
    const followers = Array.from({ length: 3 }, () => cache.open(call(), route).then((t) => (settled.push(t), t)));
    leader.abandon();
    await vi.waitFor(() => expect(settled).toHaveLength(1));
    const next = settled[0];
    expect(next.status).toBe('miss');
    expect(next.fills).toBe(true);
    expect(cache.inFlight).toBe(1);
    await next.fill(JSON.stringify(answer), answer);
    const tickets = await Promise.all(followers);
    expect(tickets.filter((t) => t !== next).map((t) => t.status)).toEqual(['hit', 'hit']);
    expect(cache.inFlight).toBe(0);
  });

  it('passes the lead along one follower at a time while each leader fails (the same 400 for everyone), then is done', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const settled: CacheTicket[] = [];
    const followers = Array.from({ length: 4 }, () => cache.open(call(), route).then((t) => (settled.push(t), t)));
    leader.abandon();
    for (let turn = 1; turn <= 4; turn++) {
      await vi.waitFor(() => expect(settled).toHaveLength(turn));
      // Only the one whose turn it is goes on; the rest still wait on it.
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(settled).toHaveLength(turn);
      expect(cache.inFlight).toBe(1);
      settled[turn - 1]?.abandon();
    }
    expect((await Promise.all(followers)).map((t) => t.status)).toEqual(Array(4).fill('miss'));
    expect(cache.inFlight).toBe(0);
  });

  it('lets the followers still in line go on alone once their wait runs out, however many turns are left', async () => {
    const { cache, call } = setup(100);
    const leader = await cache.open(call(), route);
    const followers = Array.from({ length: 3 }, () => cache.open(call(), route));
    const started = Date.now();
    // The next leader never finishes: the two behind it go on alone at the first deadline.
    leader.abandon();
    const tickets = await Promise.all(followers);
    expect(Date.now() - started).toBeLessThan(1000);
    expect(tickets.map((t) => t.status)).toEqual(['miss', 'miss', 'miss']);
    expect(cache.inFlight).toBe(0);
  });

  it('bounds the wait: a follower of a slow leader calls the upstream itself', async () => {
    const { cache, call } = setup(50);
    const leader = await cache.open(call(), route);
    const follower = await cache.open(call(), route);
    expect(follower.status).toBe('miss');
    expect(follower.hit).toBeUndefined();
    leader.abandon();
  });

  it('lets a flight whose leader never finished go once a follower waited it out: the next call leads and fills', async () => {
    const { cache, call } = setup(50);
    // A leader whose ticket is never filled nor abandoned (a bug between its upstream call and its fill).
    await cache.open(call(), route);
    const follower = await cache.open(call(), route);
    expect(follower.status).toBe('miss');
    expect(cache.inFlight).toBe(0);
    const next = await cache.open(call(), route);
    expect(cache.inFlight).toBe(1);
    await next.fill(JSON.stringify(answer), answer);
    expect((await cache.open(call(), route)).status).toBe('hit');
  });

  it('stores no answer whose choices lack a message: a stream replay of it could not render them', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const shapeless = { ...answer, choices: [{ index: 0, finish_reason: 'stop' }] } as unknown as typeof answer;
    await leader.fill(JSON.stringify(shapeless), shapeless);
    expect(cache.inFlight).toBe(0);
    expect((await cache.open(call(), route)).status).toBe('miss');
  });

  it.each([
    ['a top-level error', { ...answer, error: { code: 502, message: 'provider failed mid-generation' } }],
    ['a choice finished as "error"', { ...answer, choices: [{ index: 0, message: { role: 'assistant', content: 'half' }, finish_reason: 'error' }] }],
  ])('stores no answer that carries %s (OpenRouter reports failures inside a 200 so)', async (_what, failed) => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const completion = failed as unknown as typeof answer;
    await leader.fill(JSON.stringify(completion), completion);
    expect(cache.inFlight).toBe(0);
    expect((await cache.open(call(), route)).status).toBe('miss');
  });

  it('stops waiting when the follower’s client goes away', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const gone = new AbortController();
    const pending = cache.open(call(gone.signal), route);
    gone.abort();
    expect((await pending).hit).toBeUndefined();
    leader.abandon();
  });

  it('never hands the lead to a follower whose client has left: it neither leads nor stores', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const gone = new AbortController();
    const left = cache.open(call(gone.signal), route);
    const staying = cache.open(call(), route);
    gone.abort();
    const ticket = await left;
    expect(ticket.fills).toBe(false);
    leader.abandon();
    const next = await staying;
    expect(next.fills).toBe(true);
    expect(cache.inFlight).toBe(1);
    next.abandon();
  });

  it('bypasses, never fails, when the store throws', async () => {
    const broken = new MemoryResponseCache(new SystemClock(), 10, 1000);
    broken.lookup = (): Promise<CacheLookup> => Promise.reject(new Error('store down'));
    const { cache, call } = setup(5000, broken);
    expect((await cache.open(call(), route)).status).toBe('bypass');
  });

  it('does not cache a stream that cannot be replayed', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    expect(leader.fills).toBe(true);
    await leader.fillFromStream(assembleCompletion([JSON.stringify({ id: 'c', choices: [{ index: 0, delta: { content: 'cut' }, finish_reason: null }] })]));
    expect((await cache.open(call(), route)).status).toBe('miss');
  });

  it('stores a finished stream as the completion it amounts to, served to JSON callers as is', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const chunk = (delta: object, finish: string | null) =>
      JSON.stringify({ id: 'c', object: 'chat.completion.chunk', created: 1, model: 'm', choices: [{ index: 0, delta, finish_reason: finish }] });
    await leader.fillFromStream(assembleCompletion([chunk({ role: 'assistant', content: 'h' }, null), chunk({ content: 'i' }, null), chunk({}, 'stop')]));
    const hit = await cache.open(call(), route);
    expect(hit.hit?.completion.choices[0]?.message).toEqual({ role: 'assistant', content: 'hi' });
    expect(JSON.parse(hit.hit?.raw ?? '')).toEqual(hit.hit?.completion);
  });

  it('answers from the entry as it is now, not from an answer decoded for the same key before', async () => {
    const { cache, call, store } = setup();
    const first = await cache.open(call(), route);
    await first.fill(JSON.stringify(answer), answer);
    const hot = await cache.open(call(), route);
    expect(hot.hit?.replay(false).join('')).toContain('"hi"');
    // Gone from the store behind this instance's back (TTL, another instance's delete), then refilled.
    await store.invalidate({});
    const again = await cache.open(call(), route);
    expect(again.status).toBe('miss');
    const changed = testCompletion('bye');
    await again.fill(JSON.stringify(changed), changed);
    const hit = await cache.open(call(), route);
    expect(JSON.parse(hit.hit?.raw ?? '')).toEqual(changed);
    expect(hit.hit?.completion.choices[0]?.message.content).toBe('bye');
    expect(hit.hit?.replay(false).join('')).toContain('"bye"');
    expect(hit.hit?.replay(false).join('')).not.toContain('"hi"');
  });

  it('replays a hot entry with or without the usage chunk, as each caller asks', async () => {
    const { cache, call } = setup();
    const withUsage = { ...answer, usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 } };
    const leader = await cache.open(call(), route);
    await leader.fill(JSON.stringify(withUsage), withUsage);
    const usageOf = (payloads: readonly string[] | undefined) => (payloads ?? []).map((p) => (JSON.parse(p) as { usage?: unknown }).usage).filter(Boolean);
    expect(usageOf((await cache.open(call(), route)).hit?.replay(true))).toEqual([withUsage.usage]);
    expect(usageOf((await cache.open(call(), route)).hit?.replay(false))).toEqual([]);
    expect(usageOf((await cache.open(call(), route)).hit?.replay(true))).toEqual([withUsage.usage]);
  });

  it('keeps one hit from changing the answer the next hit gets', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    await leader.fill(JSON.stringify(answer), answer);
    const first = await cache.open(call(), route);
    const message = first.hit?.completion.choices[0]?.message as { content: string };
    expect(() => {
      message.content = 'tampered';
    }).toThrow(TypeError);
    expect((await cache.open(call(), route)).hit?.completion.choices[0]?.message.content).toBe('hi');
  });

  it('asks for no stream assembly when nothing will be stored', async () => {
    const { cache, call } = setup();
    const noStore = await cache.open({ ...call(), cacheControl: { read: true, write: false, ttlSeconds: undefined } }, route);
    expect(noStore.fills).toBe(false);
    const tools = await cache.open({ ...call(), body: { messages: [{ role: 'user', content: 'x' }], tools: [{ type: 'function' }] } }, route);
    expect(tools.status).toBe('bypass');
    expect(tools.fills).toBe(false);
  });
});

// DELETE /admin/cache while an identical call is with the upstream: the answer it brings back may
// be just what the admin purged, and storing it would undo the purge for the whole TTL.
describe('CompletionCache purge while a fill is in flight', () => {
  it('does not store an answer whose call began before a purge, yet hands it to the callers waiting for it', async () => {
    const { cache, call } = setup();
    const leader = await cache.open(call(), route);
    const followers = Array.from({ length: 3 }, () => cache.open(call(), route));
    await cache.invalidate({ model: 'm' });
    await leader.fill(JSON.stringify(answer), answer);
    const tickets = await Promise.all(followers);
    expect(tickets.map((t) => t.status)).toEqual(['hit', 'hit', 'hit']);
    expect(tickets[0]?.hit?.completion.choices[0]?.message.content).toBe('hi');
    expect(cache.inFlight).toBe(0);
    const after = await cache.open(call(), route);
    expect(after.status).toBe('miss');
    // That one began after the purge: its answer is stored as usual.
    await after.fill(JSON.stringify(answer), answer);
    expect((await cache.open(call(), route)).status).toBe('hit');
  });

  it('frees the fill lock with the answer handed over, for waiters on other instances', async () => {
    const { cache, call, store } = setup();
    const release = vi.spyOn(store as ResponseCache, 'release');
    const leader = await cache.open(call(), route);
    await cache.invalidate({});
    await leader.fill(JSON.stringify(answer), answer);
    expect(release).toHaveBeenCalledTimes(1);
    expect(release.mock.calls[0]?.[2]).toContain('"hi"');
    expect(await store.peek(release.mock.calls[0]?.[0] ?? '')).toEqual({ kind: 'free' });
  });

  it('does not store a fill in flight across a purge the store heard of (another instance’s)', async () => {
    const store = new MemoryResponseCache(new SystemClock(), 100, 100_000);
    let heard: () => void = () => undefined;
    store.onPurge = (listener) => {
      heard = listener;
    };
    const { cache, call } = setup(5000, store);
    const leader = await cache.open(call(), route);
    heard();
    await leader.fill(JSON.stringify(answer), answer);
    expect((await cache.open(call(), route)).status).toBe('miss');
  });
});

describe('CompletionCache waiting on another instance', () => {
  /** A store where another instance holds the fill lock until `land()`; `announce()` is its broadcast. */
  function elsewhere(announces: boolean) {
    const store = new MemoryResponseCache(new SystemClock(), 10, 100_000);
    let landed = false;
    let peeks = 0;
    const wakers: Array<() => void> = [];
    const entry = encodeCacheEntry(JSON.stringify(answer), answer);
    store.lookup = (): Promise<CacheLookup> => Promise.resolve(landed ? { kind: 'hit', body: entry } : { kind: 'wait' });
    store.peek = () => {
      peeks += 1;
      return Promise.resolve(landed ? { kind: 'hit', body: entry } : { kind: 'wait' });
    };
    store.watch = () => {
      if (!announces) return undefined;
      let wake = () => undefined as void;
      const landedPromise = new Promise<void>((resolve) => (wake = resolve));
      wakers.push(wake);
      return { landed: landedPromise, cancel: () => undefined };
    };
    return {
      store,
      peeks: () => peeks,
      land: () => {
        landed = true;
      },
      announce: () => wakers.splice(0).forEach((wake) => wake()),
    };
  }

  afterEach(() => {
    vi.useRealTimers();
  });

  /** Opens a call that finds the other instance filling, on fake timers; `ticket()` once it settles. */
  function waitOn(other: ReturnType<typeof elsewhere>) {
    vi.useFakeTimers();
    const { cache, call } = setup(60_000, other.store);
    let ticket: CacheTicket | undefined;
    void cache.open(call(), route).then((t) => (ticket = t));
    return () => ticket;
  }

  it('looks again as soon as the fill is announced, not at its next poll', async () => {
    const other = elsewhere(true);
    const ticket = waitOn(other);
    await vi.advanceTimersByTimeAsync(10);
    expect(other.peeks()).toBe(1);
    await vi.advanceTimersByTimeAsync(200);
    expect(other.peeks()).toBe(1); // announced: no short polling meanwhile
    other.land();
    other.announce();
    await vi.advanceTimersByTimeAsync(0);
    expect(other.peeks()).toBe(2);
    expect(ticket()?.status).toBe('hit');
  });

  it('polls with a backoff when fills are not announced', async () => {
    const other = elsewhere(false);
    const ticket = waitOn(other);
    await vi.advanceTimersByTimeAsync(210);
    expect(other.peeks()).toBe(4); // 10, 30, 70, 150 ms
    other.land();
    await vi.advanceTimersByTimeAsync(100);
    expect(ticket()?.status).toBe('hit');
  });
});
