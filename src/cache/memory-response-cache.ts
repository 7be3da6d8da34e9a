import { randomUUID } from 'node:crypto';
import type { StoreDriver } from '../config/config.js';
import type { Clock } from '../core/clock.js';
import { ExpiringEntries } from './expiring-entries.js';
import { type CacheFilter, type CacheLookup, type CachePeek, ResponseCache, type CacheTags } from './response-cache.js';

/**
 * One instance's cache: an LRU (a read moves the entry to the end; eviction takes from the
 * front), bounded by entry count and by the UTF-8 size of the stored bodies. Expired entries are
 * dropped when met. Locks exist too, so the driver behaves like the Redis one in the
 * contract suite, although in-process singleflight already coalesces callers of one instance.
 */
export class MemoryResponseCache extends ResponseCache {
  readonly driver: StoreDriver = 'memory';
  private readonly entries: ExpiringEntries<{ body: string; tags: CacheTags }>;
  private readonly locks = new Map<string, { token: string; until: number }>();

  constructor(
    private readonly clock: Clock,
    maxEntries: number,
    maxBytes: number,
  ) {
    super();
    this.entries = new ExpiringEntries(maxEntries, maxBytes);
  }

  get size(): { entries: number; bytes: number } {
    return { entries: this.entries.size, bytes: this.entries.weight };
  }

  lookup(key: string, lockMs: number): Promise<CacheLookup> {
    const body = this.read(key);
    if (body !== undefined) return Promise.resolve({ kind: 'hit', body });
    if (lockMs <= 0) return Promise.resolve({ kind: 'miss' });
    const now = this.clock.nowMs();
    const lock = this.locks.get(key);
    if (lock && lock.until > now) return Promise.resolve({ kind: 'wait' });
    const token = randomUUID();
    this.locks.set(key, { token, until: now + lockMs });
    return Promise.resolve({ kind: 'lead', token });
  }

  peek(key: string): Promise<CachePeek> {
    const body = this.read(key);
    if (body !== undefined) return Promise.resolve({ kind: 'hit', body });
    const lock = this.locks.get(key);
    return Promise.resolve(lock && lock.until > this.clock.nowMs() ? { kind: 'wait' } : { kind: 'free' });
  }

  store(key: string, body: string, ttlMs: number, tags: CacheTags, token?: string): Promise<void> {
    if (token !== undefined) this.releaseNow(key, token);
    // One answer larger than the whole cache is simply not kept (ExpiringEntries.set).
    if (ttlMs > 0) this.entries.set(key, { body, tags }, Buffer.byteLength(body), this.clock.nowMs() + ttlMs);
    return Promise.resolve();
  }

  release(key: string, token: string): Promise<boolean> {
    return Promise.resolve(this.releaseNow(key, token));
  }

  invalidate(filter: CacheFilter): Promise<number> {
    let deleted = 0;
    const now = this.clock.nowMs();
    for (const [key, entry] of this.entries) {
      // An expired match is dropped (by `get`) but not counted: it was already gone for readers,
      // and on Redis it is gone for good, so both drivers report the same number.
      if (matches(entry.tags, filter) && this.entries.get(key, now) !== undefined) {
        this.entries.delete(key);
        deleted += 1;
      }
    }
    return Promise.resolve(deleted);
  }

  available(): boolean {
    return true;
  }

  describe(): { state: 'up'; details: Record<string, unknown> } {
    return { state: 'up', details: { driver: 'memory', entries: this.entries.size, bytes: this.entries.weight } };
  }

  /** A read makes the entry the most recently used: the memory driver evicts least recently used first. */
  private read(key: string): string | undefined {
    return this.entries.get(key, this.clock.nowMs(), true)?.body;
  }

  private releaseNow(key: string, token: string): boolean {
    const lock = this.locks.get(key);
    if (lock?.token !== token) return false;
    this.locks.delete(key);
    return true;
  }
}

export function matches(tags: CacheTags, filter: CacheFilter): boolean {
  if (filter.userId !== undefined && tags.userId !== filter.userId) return false;
  if (filter.departmentId !== undefined && tags.departmentId !== filter.departmentId) return false;
  if (filter.model !== undefined && !tags.models.includes(filter.model)) return false;
  return true;
}
