import { randomUUID } from 'node:crypto';
import type { StoreDriver } from '../config/config.js';
import type { Clock } from '../core/clock.js';
import { type CacheFilter, type CacheLookup, type CachePeek, ResponseCache, type CacheTags } from './response-cache.js';

interface Entry {
  body: string;
  bytes: number;
  expiresAt: number;
  tags: CacheTags;
}

/**
 * One instance's cache: a Map used as an LRU (a read moves the entry to the end; eviction takes
 * from the front), bounded by entry count and by the UTF-8 size of the stored bodies. Expired
 * entries are dropped when met. Locks exist too, so the driver behaves like the Redis one in the
 * contract suite, although in-process singleflight already coalesces callers of one instance.
 */
export class MemoryResponseCache extends ResponseCache {
  readonly driver: StoreDriver = 'memory';
  private readonly entries = new Map<string, Entry>();
  private readonly locks = new Map<string, { token: string; until: number }>();
  private bytes = 0;

  constructor(
    private readonly clock: Clock,
    private readonly maxEntries: number,
    private readonly maxBytes: number,
  ) {
    super();
  }

  get size(): { entries: number; bytes: number } {
    return { entries: this.entries.size, bytes: this.bytes };
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
    const bytes = Buffer.byteLength(body);
    // One answer larger than the whole cache is simply not kept.
    if (bytes > this.maxBytes || ttlMs <= 0) return Promise.resolve();
    this.remove(key);
    this.entries.set(key, { body, bytes, expiresAt: this.clock.nowMs() + ttlMs, tags });
    this.bytes += bytes;
    while (this.entries.size > this.maxEntries || this.bytes > this.maxBytes) {
      const oldest = this.entries.keys().next();
      if (oldest.done) break;
      this.remove(oldest.value);
    }
    return Promise.resolve();
  }

  release(key: string, token: string): Promise<boolean> {
    return Promise.resolve(this.releaseNow(key, token));
  }

  invalidate(filter: CacheFilter): Promise<number> {
    let deleted = 0;
    for (const [key, entry] of this.entries) {
      if (matches(entry.tags, filter)) {
        this.remove(key);
        deleted += 1;
      }
    }
    return Promise.resolve(deleted);
  }

  available(): boolean {
    return true;
  }

  describe(): { state: 'up'; details: Record<string, unknown> } {
    return { state: 'up', details: { driver: 'memory', entries: this.entries.size, bytes: this.bytes } };
  }

  private read(key: string): string | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    if (entry.expiresAt <= this.clock.nowMs()) {
      this.remove(key);
      return undefined;
    }
    // Most recently used goes to the end of the Map's order.
    this.entries.delete(key);
    this.entries.set(key, entry);
    return entry.body;
  }

  private remove(key: string): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    this.entries.delete(key);
    this.bytes -= entry.bytes;
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
