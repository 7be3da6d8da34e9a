import type { StoreDriver } from '../config/config.js';
import type { Clock } from '../core/clock.js';
import { type Bucket, type HitResult, RateLimitStore } from './rate-limit.store.js';

interface Counter {
  used: number;
  resetAt: number;
}

const SWEEP_EVERY = 10_000;

/**
 * Per-instance counters. Single-threaded JavaScript makes `hit` atomic as long as it does not
 * await between the check and the count, which it does not.
 */
export class MemoryRateLimitStore extends RateLimitStore {
  readonly driver: StoreDriver = 'memory';
  private readonly counters = new Map<string, Counter>();
  private calls = 0;

  constructor(private readonly clock: Clock) {
    super();
  }

  hit(buckets: readonly Bucket[]): Promise<HitResult> {
    return Promise.resolve(this.hitNow(buckets));
  }

  hitNow(buckets: readonly Bucket[]): HitResult {
    const now = this.clock.nowMs();
    this.maybeSweep(now);
    const current = buckets.map((b) => {
      const c = this.counters.get(b.key);
      return c && c.resetAt > now ? c : undefined;
    });
    const states = buckets.map((b, i) => {
      const used = current[i]?.used ?? 0;
      const blocked = b.cost > 0 ? used + b.cost > b.limit : used >= b.limit;
      return { used, resetMs: current[i] ? current[i].resetAt - now : b.windowMs, blocked };
    });
    const allowed = states.every((s) => !s.blocked);
    if (allowed) {
      buckets.forEach((b, i) => {
        if (b.cost <= 0) return;
        let c = current[i];
        if (!c) {
          c = { used: 0, resetAt: now + b.windowMs };
          this.counters.set(b.key, c);
        }
        c.used += b.cost;
        const state = states[i] as { used: number; resetMs: number };
        state.used = c.used;
        state.resetMs = c.resetAt - now;
      });
    }
    return { allowed, states };
  }

  add(keys: readonly string[], amount: number, windowMs: number): Promise<void> {
    const now = this.clock.nowMs();
    for (const key of keys) {
      const c = this.counters.get(key);
      if (c && c.resetAt > now) c.used += amount;
      else this.counters.set(key, { used: amount, resetAt: now + windowMs });
    }
    return Promise.resolve();
  }

  describe(): { state: 'up'; details: Record<string, unknown> } {
    return { state: 'up', details: { driver: 'memory', counters: this.counters.size } };
  }

  /** Expired counters are dropped in passing, so idle keys do not pile up. */
  private maybeSweep(now: number): void {
    this.calls += 1;
    if (this.calls % SWEEP_EVERY !== 0) return;
    for (const [key, c] of this.counters) if (c.resetAt <= now) this.counters.delete(key);
  }
}
