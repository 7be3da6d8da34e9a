import type { StoreDriver } from '../config/config.js';

/** Who wrote an entry and which models it came from: what `DELETE /admin/cache` filters on. */
export interface CacheTags {
  userId: string;
  departmentId: string;
  /** The resolved chain and the model that answered (deduplicated). */
  models: string[];
}

/** AND of the given fields; an empty filter means everything. */
export interface CacheFilter {
  userId?: string;
  departmentId?: string;
  model?: string;
}

/**
 * `lookup` in one round trip: the entry, or (when asked to) the fill lock for this key.
 * - `hit`: the stored body.
 * - `lead`: no entry, and this caller now holds the lock with `token`: it calls the upstream.
 * - `wait`: no entry, someone else holds the lock: poll `peek` for their answer.
 * - `miss`: no entry, and no lock was asked for.
 */
export type CacheLookup = { kind: 'hit'; body: string } | { kind: 'lead'; token: string } | { kind: 'wait' } | { kind: 'miss' };

/** For waiters: the answer has landed, the leader is still at work, or the lock is gone without an answer. */
export type CachePeek = { kind: 'hit'; body: string } | { kind: 'wait' } | { kind: 'free' };

/**
 * The response cache port. Drivers: `MemoryResponseCache` (one instance; LRU bounded by entries
 * and bytes) and `RedisResponseCache` (shared by every instance). Both pass the contract suite in
 * ./testing. Entries are the final chat.completion JSON as a string; keys are opaque (see
 * cache-key.ts). Every method may throw when the store is unreachable; CompletionCache turns
 * that into a bypass, never into a failed request.
 */
export abstract class ResponseCache {
  abstract readonly driver: StoreDriver;

  /** `lockMs` > 0 asks for the fill lock on a miss (singleflight across instances). */
  abstract lookup(key: string, lockMs: number): Promise<CacheLookup>;

  abstract peek(key: string): Promise<CachePeek>;

  /**
   * Stores the entry for `ttlMs` and, when `token` holds the lock, releases it in the same step.
   * Resolving means the fill was sent, not that another instance can read it yet: the Redis
   * driver sends it without waiting for the reply. Until it lands, others are told to wait
   * (`peek`), and `watch` tells them when it has.
   */
  abstract store(key: string, body: string, ttlMs: number, tags: CacheTags, token?: string): Promise<void>;

  /**
   * Releases the lock only if `token` still holds it (a slow leader must not free a successor's lock).
   * `handoff`: an answer that must not be stored (a purge happened while it was generated) but
   * that other instances waiting on this lock get from `peek`, briefly, instead of calling the
   * upstream again. Drivers without other instances (memory) may ignore it: the waiters of this
   * instance get it from CompletionCache itself.
   */
  abstract release(key: string, token: string, handoff?: string): Promise<boolean>;

  /** Deletes the matching entries; returns how many were deleted. */
  abstract invalidate(filter: CacheFilter): Promise<number>;

  /** True while the store answers; false makes every request bypass the cache. */
  abstract available(): boolean;

  /** For /health/ready. */
  abstract describe(): { state: 'up' | 'degraded'; details: Record<string, unknown> };

  /**
   * For a caller told to wait on another instance's fill: `landed` settles when that fill or its
   * release is announced, a hint to look again now rather than at the next poll. Drivers without
   * other instances (memory) have nothing to announce. Call `cancel` when done waiting.
   */
  watch(_key: string): { landed: Promise<void>; cancel(): void } | undefined {
    return undefined;
  }

  /**
   * `listener` is called whenever entries may have been deleted: by another instance's purge
   * (heard before its delete runs), while such a purge could not be heard, or by this instance's
   * `invalidate`. A fill that started before must not be stored. Drivers without other
   * instances (memory) never call it: CompletionCache counts its own purges.
   */
  onPurge(_listener: () => void): void {
    // Nothing to hear.
  }
}
