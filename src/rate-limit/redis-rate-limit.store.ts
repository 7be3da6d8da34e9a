import type { Logger } from 'pino';
import type { StoreDriver } from '../config/config.js';
import type { Clock } from '../core/clock.js';
import { FallbackState } from '../redis/fallback-state.js';
import { LuaScript } from '../redis/lua-script.js';
import type { RedisCommands } from '../redis/resp-client.js';
import type { MemoryRateLimitStore } from './memory-rate-limit.store.js';
import { type Bucket, type BucketState, type HitResult, RateLimitStore } from './rate-limit.store.js';

// Check every bucket, then count in all of them only if none refuses: all-or-nothing in one
// atomic step. ARGV holds (limit, windowMs, cost, want, refund, refundTtl) per key: up to `want` more
// requests are counted ahead for the calling instance's lease when the request is allowed, but
// never more than a quarter of what the window has left, so that leases shrink as a limit nears
// and its last requests are not all held by one instance. `refund` is the unspent rest of a lease
// this instance voided (its limit changed): taken off the counter first, never below 0, since
// those requests were never made; only while the counter is still the lease's window (its TTL at
// most `refundTtl`, the rest of that window): a counter Redis lost and began again holds none of
// them. Returns {allowed, used1, pttl1, blocked1, granted1, used2, …},
// `used` after the request and its grant.
const HIT = new LuaScript(
  `local n = #KEYS
local used, ttl, blocked = {}, {}, {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[i * 6 - 5])
  local cost = tonumber(ARGV[i * 6 - 3])
  local refund = tonumber(ARGV[i * 6 - 1])
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if refund > 0 and used[i] > 0 then
    local left = redis.call('PTTL', KEYS[i])
    if left >= 0 and left <= tonumber(ARGV[i * 6]) then
      used[i] = redis.call('DECRBY', KEYS[i], math.min(refund, used[i]))
    end
  end
  ttl[i] = redis.call('PTTL', KEYS[i])
  if (cost > 0 and used[i] + cost > limit) or (cost <= 0 and used[i] >= limit) then
    blocked[i] = 1
    allowed = 0
  else
    blocked[i] = 0
  end
end
local out = {allowed}
for i = 1, n do
  local granted = 0
  local cost = tonumber(ARGV[i * 6 - 3])
  if allowed == 1 and cost > 0 then
    granted = math.max(0, math.min(tonumber(ARGV[i * 6 - 2]), math.floor((tonumber(ARGV[i * 6 - 5]) - used[i] - cost) / 4)))
    used[i] = redis.call('INCRBY', KEYS[i], cost + granted)
    if ttl[i] < 0 then
      redis.call('PEXPIRE', KEYS[i], ARGV[i * 6 - 4])
      ttl[i] = tonumber(ARGV[i * 6 - 4])
    end
  end
  if ttl[i] < 0 then ttl[i] = tonumber(ARGV[i * 6 - 4]) end
  out[#out + 1] = used[i]
  out[#out + 1] = ttl[i]
  out[#out + 1] = blocked[i]
  out[#out + 1] = granted
end
return out`,
  'rate-limit-hit',
);

// Tokens used by an answer, added to each counter; a new counter starts its window.
const ADD = new LuaScript(
  `for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[1])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1`,
  'rate-limit-add',
);

/** How much longer than this instance reckons its lease's window may still run Redis's TTL may be, for a refund. */
const REFUND_SLACK_MS = 1000;

/** How long the key written by a readiness check after a failure lives (`<prefix>rl:probe`). */
const PROBE_TTL_MS = 10_000;

/** A lease never exceeds this many requests, however large the limit. */
export const LEASE_MAX = 100;

/** Counters one instance holds leases of at once (a few hundred kB at most). */
export const LEASED_COUNTERS_MAX = 10_000;

/**
 * How many requests an instance takes ahead for a limit: `percent` of it, at most LEASE_MAX; 0
 * when that is under two requests (a lease of one saves nothing), so small limits stay exact.
 */
export function leaseSize(limit: number, percent: number): number {
  const size = Math.min(LEASE_MAX, Math.floor((limit * percent) / 100));
  return size >= 2 ? size : 0;
}

/** Requests this instance counted ahead in one Redis window of one counter, and has not admitted yet. */
interface Lease {
  /** The limit it was granted under: another limit (an admin override) voids it. */
  readonly limit: number;
  left: number;
  /** The largest counter value Redis reported in this window (it includes every lease granted). */
  seen: number;
  /** When the Redis window ends (this instance's clock): the counter restarts, the lease is void. */
  until: number;
}

/**
 * Counters shared by every instance. While Redis is unreachable (not connected, or a command
 * fails) the per-instance memory store answers instead: limits then hold per instance only,
 * which /health/ready reports as degraded (after a failure, until a write succeeds: a connection
 * alone proves nothing) and the log says once per transition.
 *
 * **Leases** (`leasePercent` > 0). A request counter whose limit is large enough is counted
 * ahead: the request that asks Redis also takes a lease of up to `leaseSize` requests in the same
 * atomic step, and the next requests are admitted from it without a round trip, until it runs out
 * or the window ends. The limit still holds across instances, since every lease is counted in
 * Redis before it is spent; what a lease costs is that requests another instance leased and never
 * admitted are lost to this window (at most `leaseSize` per other instance), and that the
 * remaining count in the headers is this instance's view. Token counters (cost 0) always ask
 * Redis. docs/operations.md, "Rate limits and cache across instances".
 */
export class RedisRateLimitStore extends RateLimitStore {
  readonly driver: StoreDriver = 'redis';
  private readonly state: FallbackState;
  private readonly ns: string;
  private readonly leases = new Map<string, Lease>();
  /** Counters with a lease request on its way: concurrent requests ask without one, not for one each. */
  private readonly asking = new Set<string>();
  private readonly maxLeased: number;

  constructor(
    private readonly client: RedisCommands,
    keyPrefix: string,
    private readonly fallback: MemoryRateLimitStore,
    logger: Logger,
    private readonly lease: { readonly percent: number; readonly clock: Clock; readonly maxCounters?: number } | undefined = undefined,
  ) {
    super();
    this.ns = `${keyPrefix}rl:`;
    this.maxLeased = lease?.maxCounters ?? LEASED_COUNTERS_MAX;
    this.state = new FallbackState(logger, {
      degraded: 'Redis unavailable: rate limits fall back to per-instance memory counters',
      recovered: 'Redis back: rate limits shared across instances again',
    });
  }

  async hit(buckets: readonly Bucket[]): Promise<HitResult> {
    if (this.client.status !== 'ready') {
      this.dropLeases();
      this.state.fail(`connection ${this.client.status}`);
      return this.fallback.hit(buckets);
    }
    const now = this.lease ? this.lease.clock.nowMs() : 0;
    // Buckets this instance can admit from its lease, taken now and given back if Redis refuses
    // one of the others; the rest ask Redis.
    const local: Array<Lease | undefined> = [];
    const remote: number[] = [];
    for (let i = 0; i < buckets.length; i++) {
      const b = buckets[i];
      const held = this.lease && b.cost > 0 ? this.leases.get(b.key) : undefined;
      if (held && held.limit === b.limit && held.until > now && held.left >= b.cost) {
        held.left -= b.cost;
        local[i] = held;
      } else {
        remote.push(i);
      }
    }
    if (remote.length === 0) return { allowed: true, states: buckets.map((_, i) => leaseState(local[i] as Lease, now)) };

    const args: number[] = [];
    const asked: string[] = [];
    for (const i of remote) {
      const b = buckets[i];
      let want = this.lease && b.cost > 0 ? leaseSize(b.limit, this.lease.percent) : 0;
      if (want > 0 && this.asking.has(b.key)) want = 0;
      else if (want > 0) {
        this.asking.add(b.key);
        asked.push(b.key);
      }
      args.push(b.limit, Math.ceil(b.windowMs), b.cost, want);
      this.pushVoidedRest(args, b, now);
    }
    let reply: unknown;
    try {
      reply = await HIT.run(
        this.client,
        remote.map((i) => this.ns + buckets[i].key),
        args,
      );
    } catch (error) {
      this.dropLeases();
      this.state.fail((error as Error).message);
      return this.fallback.hit(buckets);
    } finally {
      for (const key of asked) this.asking.delete(key);
    }
    const flat = reply as number[];
    const allowed = flat[0] === 1;
    // Only an admission wrote (its count): a refusal is a read a read-only Redis (a demoted
    // primary, a full one under noeviction) still answers, and taken for a recovery it flipped
    // readiness back to up and logged "Redis back" once per refused request.
    if (allowed) this.state.ok();
    const at = this.lease ? this.lease.clock.nowMs() : 0;
    const states: BucketState[] = [];
    remote.forEach((i, j) => {
      const b = buckets[i];
      const used = Number(flat[1 + j * 4]);
      const resetMs = Number(flat[2 + j * 4]);
      const blocked = flat[3 + j * 4] === 1;
      const granted = Number(flat[4 + j * 4]);
      const held = this.lease && b.cost > 0 ? this.noteWindow(b, used, resetMs, granted, at) : undefined;
      states[i] = { used: held ? held.seen - held.left : used, resetMs, blocked };
    });
    buckets.forEach((b, i) => {
      const held = local[i];
      if (!held) return;
      if (!allowed) held.left += b.cost;
      states[i] = leaseState(held, at);
    });
    return { allowed, states };
  }

  /**
   * Voids a lease of this window granted under another limit (an admin changed it) and adds its
   * unspent requests to the script's arguments, which the request asking now takes off the counter: they were counted in
   * Redis but never made, and left there they would refuse a lowered limit's first requests, or
   * shrink a raised one, for the rest of the window. Taken out of the table here, so it is given
   * back once even with several requests asking at the same time.
   */
  private pushVoidedRest(args: number[], b: Bucket, now: number): void {
    const held = this.lease && b.cost > 0 ? this.leases.get(b.key) : undefined;
    if (!held || held.limit === b.limit) {
      args.push(0, 0);
      return;
    }
    this.leases.delete(b.key);
    // With the rest of its window (plus a second of clock and transit slack): Redis gives it back
    // only to the counter that window began, not one begun after Redis lost it.
    if (held.until > now) args.push(held.left, held.until - now + REFUND_SLACK_MS);
    else args.push(0, 0);
  }

  /**
   * Folds what Redis said about a counter into this instance's lease of its window: the largest
   * count seen, and what was granted. Returns the lease of this window, if there is one.
   */
  private noteWindow(b: Bucket, used: number, resetMs: number, granted: number, now: number): Lease | undefined {
    let held = this.leases.get(b.key);
    // A lease of an ended window, or under another limit, is void.
    if (held && (held.until <= now || held.limit !== b.limit)) {
      this.leases.delete(b.key);
      held = undefined;
    }
    if (!held) {
      if (granted <= 0) return undefined;
      if (this.leases.size >= this.maxLeased) this.sweep(now);
      held = { limit: b.limit, left: 0, seen: 0, until: 0 };
      this.leases.set(b.key, held);
    }
    held.left += granted;
    held.seen = Math.max(held.seen, used);
    held.until = now + resetMs;
    return held;
  }

  /**
   * Keeps the lease table bounded however many keys, users and departments come by: ended
   * windows go first, then the oldest leases (a dropped lease only costs its unspent requests).
   */
  private sweep(now: number): void {
    for (const [key, held] of this.leases) if (held.until <= now) this.leases.delete(key);
    for (const key of this.leases.keys()) {
      if (this.leases.size < this.maxLeased) break;
      this.leases.delete(key);
    }
  }

  /** Redis may have restarted or lost its counters: what it granted before proves nothing now. */
  private dropLeases(): void {
    this.leases.clear();
  }

  async add(keys: readonly string[], amount: number, windowMs: number): Promise<void> {
    if (keys.length === 0 || amount <= 0) return;
    if (this.client.status !== 'ready') {
      this.state.fail(`connection ${this.client.status}`);
      return this.fallback.add(keys, amount, windowMs);
    }
    try {
      await ADD.run(
        this.client,
        keys.map((k) => this.ns + k),
        [Math.ceil(amount), Math.ceil(windowMs)],
      );
      this.state.ok();
    } catch (error) {
      this.state.fail((error as Error).message);
      await this.fallback.add(keys, amount, windowMs);
    }
  }

  describe(): { state: 'up' | 'degraded'; details: Record<string, unknown> } {
    const ready = this.client.status === 'ready';
    // Connected, after a failure: up once a write goes through, this harmless one (so that an
    // instance without traffic finds out too) or a request's. Each check sends at most one.
    if (ready) this.state.recheck(() => this.client.call('SET', `${this.ns}probe`, '1', 'PX', PROBE_TTL_MS));
    if (!ready || this.state.degraded)
      return { state: 'degraded', details: { driver: 'redis', mode: 'per-instance memory counters', ...this.state.describe() } };
    return { state: 'up', details: { driver: 'redis', lease_percent: this.lease?.percent ?? 0, leased_counters: this.leases.size } };
  }
}

/** A bucket admitted from this instance's lease: the count as this instance sees it. */
function leaseState(held: Lease, now: number): BucketState {
  return { used: held.seen - held.left, resetMs: Math.max(0, held.until - now), blocked: false };
}
