import type { Logger } from 'pino';
import type { StoreDriver } from '../config/config.js';
import { FallbackState } from '../redis/fallback-state.js';
import { LuaScript } from '../redis/lua-script.js';
import type { RedisCommands } from '../redis/resp-client.js';
import type { MemoryRateLimitStore } from './memory-rate-limit.store.js';
import { type Bucket, type HitResult, RateLimitStore } from './rate-limit.store.js';

// Check every bucket, then count in all of them only if none refuses: all-or-nothing in one
// atomic step. ARGV holds (limit, windowMs, cost) per key. Returns {allowed, used1, pttl1,
// blocked1, used2, …}.
const HIT = new LuaScript(
  `local n = #KEYS
local used, ttl, blocked = {}, {}, {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[i * 3 - 2])
  local cost = tonumber(ARGV[i * 3])
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  ttl[i] = redis.call('PTTL', KEYS[i])
  if (cost > 0 and used[i] + cost > limit) or (cost <= 0 and used[i] >= limit) then
    blocked[i] = 1
    allowed = 0
  else
    blocked[i] = 0
  end
end
if allowed == 1 then
  for i = 1, n do
    local cost = tonumber(ARGV[i * 3])
    if cost > 0 then
      used[i] = redis.call('INCRBY', KEYS[i], cost)
      if ttl[i] < 0 then
        redis.call('PEXPIRE', KEYS[i], ARGV[i * 3 - 1])
        ttl[i] = tonumber(ARGV[i * 3 - 1])
      end
    end
  end
end
local out = {allowed}
for i = 1, n do
  if ttl[i] < 0 then ttl[i] = tonumber(ARGV[i * 3 - 1]) end
  out[#out + 1] = used[i]
  out[#out + 1] = ttl[i]
  out[#out + 1] = blocked[i]
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

/**
 * Counters shared by every instance. While Redis is unreachable (not connected, or a command
 * fails) the per-instance memory store answers instead: limits then hold per instance only,
 * which /health/ready reports as degraded and the log says once per transition.
 */
export class RedisRateLimitStore extends RateLimitStore {
  readonly driver: StoreDriver = 'redis';
  private readonly state: FallbackState;
  private readonly ns: string;

  constructor(
    private readonly client: RedisCommands,
    keyPrefix: string,
    private readonly fallback: MemoryRateLimitStore,
    logger: Logger,
  ) {
    super();
    this.ns = `${keyPrefix}rl:`;
    this.state = new FallbackState(logger, {
      degraded: 'Redis unavailable: rate limits fall back to per-instance memory counters',
      recovered: 'Redis back: rate limits shared across instances again',
    });
  }

  async hit(buckets: readonly Bucket[]): Promise<HitResult> {
    if (this.client.status !== 'ready') {
      this.state.fail(`connection ${this.client.status}`);
      return this.fallback.hit(buckets);
    }
    const args: number[] = [];
    for (const b of buckets) args.push(b.limit, Math.ceil(b.windowMs), b.cost);
    let reply: unknown;
    try {
      reply = await HIT.run(
        this.client,
        buckets.map((b) => this.ns + b.key),
        args,
      );
    } catch (error) {
      this.state.fail((error as Error).message);
      return this.fallback.hit(buckets);
    }
    this.state.ok();
    const flat = reply as number[];
    return {
      allowed: flat[0] === 1,
      states: buckets.map((_, i) => ({ used: Number(flat[1 + i * 3]), resetMs: Number(flat[2 + i * 3]), blocked: flat[3 + i * 3] === 1 })),
    };
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
    if (this.client.status !== 'ready')
      return { state: 'degraded', details: { driver: 'redis', mode: 'per-instance memory counters', ...this.state.describe() } };
    // Connected again: the next request uses Redis, so say so now rather than after it.
    this.state.ok();
    return { state: 'up', details: { driver: 'redis' } };
  }
}
