import type { ThrottlerStorage } from '@nestjs/throttler';
import type { StoreDriver } from '../config/config.js';

/** One counter a request is checked against (a key's, a user's, a department's, requests or tokens). */
export interface Bucket {
  key: string;
  limit: number;
  windowMs: number;
  /**
   * What this request adds now: 1 for a request counter (allowed while used + 1 <= limit);
   * 0 for a token counter, which is only checked (allowed while used < limit) and grows after
   * the answer, when the tokens are known.
   */
  cost: number;
}

export interface BucketState {
  /** The counter after this request (unchanged when the request was refused). */
  used: number;
  /** Until the window restarts. */
  resetMs: number;
  /** This bucket alone would refuse the request. */
  blocked: boolean;
}

export interface HitResult {
  allowed: boolean;
  /** In the order of the buckets given. */
  states: BucketState[];
}

/**
 * The rate-limit storage port, and a `@nestjs/throttler` ThrottlerStorage (so `@Throttle()`
 * routes can share it). `hit` checks every bucket of a request and, only if all allow it,
 * counts it in all of them: one atomic step (one Redis round trip), so concurrent requests on
 * any number of instances can never overshoot, and a refused request costs no quota.
 *
 * Windows are fixed and start at a counter's first hit (so a burst is never split by a clock
 * minute boundary). Drivers: MemoryRateLimitStore (per instance), RedisRateLimitStore (shared,
 * falling back to per-instance memory while Redis is unreachable).
 */
export abstract class RateLimitStore implements ThrottlerStorage {
  abstract readonly driver: StoreDriver;

  abstract hit(buckets: readonly Bucket[]): Promise<HitResult>;

  /** Adds `amount` to each counter (tokens used by an answer); starts a window where there is none. */
  abstract add(keys: readonly string[], amount: number, windowMs: number): Promise<void>;

  abstract describe(): { state: 'up' | 'degraded'; details: Record<string, unknown> };

  /** ThrottlerStorage: one request counter per throttler and key. */
  async increment(key: string, ttl: number, limit: number, _blockDuration: number, throttlerName: string): ReturnType<ThrottlerStorage['increment']> {
    const result = await this.hit([{ key: `throttler:${throttlerName}:${key}`, limit, windowMs: ttl, cost: 1 }]);
    const state = result.states[0] ?? { used: 0, resetMs: ttl, blocked: false };
    const seconds = Math.ceil(state.resetMs / 1000);
    return {
      totalHits: result.allowed ? state.used : state.used + 1,
      timeToExpire: seconds,
      isBlocked: !result.allowed,
      timeToBlockExpire: result.allowed ? 0 : seconds,
    };
  }
}
