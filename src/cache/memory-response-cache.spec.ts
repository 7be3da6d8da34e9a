import { describe, expect, it } from 'vitest';
import { ManualClock } from '../core/clock.js';
import { MemoryResponseCache } from './memory-response-cache.js';

const tags = { userId: 'u', departmentId: 'd', models: ['m'] };

describe('MemoryResponseCache bounds', () => {
  it('evicts the least recently used entry beyond the entry bound', async () => {
    const cache = new MemoryResponseCache(new ManualClock(), 2, 1_000_000);
    await cache.store('a', 'A', 60_000, tags);
    await cache.store('b', 'B', 60_000, tags);
    await cache.lookup('a', 0); // a is now the most recently used
    await cache.store('c', 'C', 60_000, tags);
    expect((await cache.lookup('b', 0)).kind).toBe('miss');
    expect((await cache.lookup('a', 0)).kind).toBe('hit');
    expect((await cache.lookup('c', 0)).kind).toBe('hit');
  });

  it('keeps the total size under the byte bound and skips an answer bigger than the whole cache', async () => {
    const cache = new MemoryResponseCache(new ManualClock(), 100, 10);
    await cache.store('a', '12345', 60_000, tags);
    await cache.store('b', 'é1234', 60_000, tags); // 6 UTF-8 bytes
    expect(cache.size).toEqual({ entries: 1, bytes: 6 });
    await cache.store('huge', '12345678901', 60_000, tags);
    expect((await cache.lookup('huge', 0)).kind).toBe('miss');
    expect(cache.size.bytes).toBe(6);
  });

  it('expires on the injected clock and frees the bytes', async () => {
    const clock = new ManualClock();
    const cache = new MemoryResponseCache(clock, 10, 1000);
    await cache.store('a', 'abc', 1000, tags);
    clock.advance(999);
    expect((await cache.lookup('a', 0)).kind).toBe('hit');
    clock.advance(1);
    expect((await cache.lookup('a', 0)).kind).toBe('miss');
    expect(cache.size).toEqual({ entries: 0, bytes: 0 });
  });

  it('does not count an expired entry a delete drops as deleted, as Redis would not', async () => {
    const clock = new ManualClock();
    const cache = new MemoryResponseCache(clock, 10, 1000);
    await cache.store('short', 'abc', 1000, tags);
    await cache.store('long', 'def', 60_000, tags);
    clock.advance(1000);
    expect(await cache.invalidate({ userId: 'u' })).toBe(1);
    expect(cache.size).toEqual({ entries: 0, bytes: 0 });
  });
});
