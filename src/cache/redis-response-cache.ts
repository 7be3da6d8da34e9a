import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { StoreDriver } from '../config/config.js';
import { FallbackState } from '../redis/fallback-state.js';
import { LuaScript } from '../redis/lua-script.js';
import type { RedisCommands } from '../redis/resp-client.js';
import { unlinkMatching } from '../redis/unlink-matching.js';
import { type CacheFilter, type CacheLookup, type CachePeek, ResponseCache, type CacheTags } from './response-cache.js';

// Entry or lock in one round trip. Returns {1, body} hit, {0} miss, {2} lead, {3} wait. A
// caller told to wait leaves a mark (KEYS[3]) so that the fill or release says so on the channel.
const LOOKUP = new LuaScript(
  `local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if ARGV[1] == '0' then return {0} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return {2} end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
return {3}`,
  'cache-lookup',
);

// Returns {1, body} when the answer landed, {3} while the lock is held (renewing the waiter's
// mark for the lock's lifetime: an earlier announcement consumed it), {4} when it is gone.
const PEEK = new LuaScript(
  `local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local t = redis.call('PTTL', KEYS[2])
if t > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', t)
  return {3}
end
return {4}`,
  'cache-peek',
);

// Entry, tag index and (when the token still holds it) lock release, atomically. A tag set lives
// as long as its longest-lived member; members that expired meanwhile are harmless on delete.
// Instances waiting on this key (their mark, KEYS[3]) hear it on the channel at once.
const STORE = new LuaScript(
  `redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ttl = tonumber(ARGV[2])
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1`,
  'cache-store',
);

// Compare-and-delete: a leader whose lock expired must not free the lock of the one after it.
// Waiting instances are told, so that one of them leads at once instead of at its next poll.
const RELEASE = new LuaScript(
  `if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0`,
  'cache-release',
);

const DELETE_BATCH = 500;

/**
 * The shared cache of every instance. Keys: `<prefix>cache:e:<hash>` (entry),
 * `cache:l:<hash>` (singleflight fill lock, with a random token), `cache:w:<hash>` (another
 * instance waits for this fill), `cache:t:{u|d|m}:<id>` (sets of entry keys by user, department
 * and model, for `DELETE /admin/cache`). A fill or release that finds a waiter publishes the hash
 * on `<prefix>cache:landed`; `landed()` takes those messages (RedisConnections.subscriber) and
 * `watch()` hands them to the waiting poll loop. While the connection is not ready, `available()`
 * is false and callers bypass the cache.
 */
export class RedisResponseCache extends ResponseCache {
  readonly driver: StoreDriver = 'redis';
  private readonly state: FallbackState;
  private readonly ns: string;
  /** The channel fills and releases are announced on when another instance waits for them. */
  readonly landedChannel: string;
  private readonly watchers = new Map<string, Set<() => void>>();
  /** The connection that hears the landed channel; without it (or while it is down) nobody is told. */
  private listener: { readonly status: string } | undefined;

  constructor(
    private readonly client: RedisCommands,
    keyPrefix: string,
    logger: Logger,
  ) {
    super();
    this.ns = `${keyPrefix}cache:`;
    this.landedChannel = `${this.ns}landed`;
    this.state = new FallbackState(logger, { degraded: 'Redis unavailable: response cache bypassed', recovered: 'Redis back: response cache in use again' });
  }

  async lookup(key: string, lockMs: number): Promise<CacheLookup> {
    const token = lockMs > 0 ? randomUUID() : '';
    const reply = await this.guard(LOOKUP.run(this.client, [this.entryKey(key), this.lockKey(key), this.waitKey(key)], [Math.max(0, Math.ceil(lockMs)), token]));
    const [code, body] = reply as [number, string | undefined];
    switch (code) {
      case 1:
        return { kind: 'hit', body: body ?? '' };
      case 2:
        return { kind: 'lead', token };
      case 3:
        return { kind: 'wait' };
      default:
        return { kind: 'miss' };
    }
  }

  async peek(key: string): Promise<CachePeek> {
    const [code, body] = (await this.guard(PEEK.run(this.client, [this.entryKey(key), this.lockKey(key), this.waitKey(key)], []))) as [number, string | undefined];
    if (code === 1) return { kind: 'hit', body: body ?? '' };
    return code === 3 ? { kind: 'wait' } : { kind: 'free' };
  }

  async store(key: string, body: string, ttlMs: number, tags: CacheTags, token?: string): Promise<void> {
    if (ttlMs <= 0) {
      if (token !== undefined) await this.release(key, token);
      return;
    }
    const tagKeys = [this.tagKey('u', tags.userId), this.tagKey('d', tags.departmentId), ...tags.models.map((m) => this.tagKey('m', m))];
    // Nobody reads the reply, and a fill never fails a request: where the connection can skip
    // it, Redis sends none, which spares the gateway a wakeup per miss (BENCHMARKS.md, session 8).
    await this.guard(
      STORE.fire(this.client, [this.entryKey(key), this.lockKey(key), this.waitKey(key), ...tagKeys], [body, Math.ceil(ttlMs), token ?? '', this.landedChannel, key]),
    );
  }

  async release(key: string, token: string): Promise<boolean> {
    return (await this.guard(RELEASE.run(this.client, [this.lockKey(key), this.waitKey(key)], [token, this.landedChannel, key]))) === 1;
  }

  /** Hands over the subscriber connection (RedisConnections.subscriber) that calls `landed`. */
  listenWith(listener: { readonly status: string }): void {
    this.listener = listener;
  }

  override watch(key: string): { landed: Promise<void>; cancel(): void } | undefined {
    if (this.listener?.status !== 'ready') return undefined;
    let wake: () => void = () => undefined;
    const landed = new Promise<void>((resolve) => (wake = resolve));
    let set = this.watchers.get(key);
    if (!set) this.watchers.set(key, (set = new Set()));
    set.add(wake);
    const cancel = () => {
      set.delete(wake);
      if (set.size === 0 && this.watchers.get(key) === set) this.watchers.delete(key);
    };
    return { landed, cancel };
  }

  /** A message from the landed channel: wakes whoever in this instance watches that key. */
  landed(key: string): void {
    const set = this.watchers.get(key);
    if (!set) return;
    this.watchers.delete(key);
    for (const wake of set) wake();
  }

  async invalidate(filter: CacheFilter): Promise<number> {
    const sets: string[] = [];
    if (filter.userId !== undefined) sets.push(this.tagKey('u', filter.userId));
    if (filter.departmentId !== undefined) sets.push(this.tagKey('d', filter.departmentId));
    if (filter.model !== undefined) sets.push(this.tagKey('m', filter.model));
    if (sets.length === 0) return this.guard(this.deleteAll());
    const members = (await this.guard(this.client.call(sets.length === 1 ? 'SMEMBERS' : 'SINTER', ...sets))) as string[];
    let deleted = 0;
    for (let i = 0; i < members.length; i += DELETE_BATCH) {
      const batch = members.slice(i, i + DELETE_BATCH);
      deleted += (await this.guard(this.client.call('UNLINK', ...batch))) as number;
      for (const set of sets) await this.guard(this.client.call('SREM', set, ...batch));
    }
    return deleted;
  }

  available(): boolean {
    const ready = this.client.status === 'ready';
    if (!ready) this.state.fail(`connection ${this.client.status}`);
    return ready;
  }

  describe(): { state: 'up' | 'degraded'; details: Record<string, unknown> } {
    if (this.client.status !== 'ready') return { state: 'degraded', details: { driver: 'redis', mode: 'bypassed', ...this.state.describe() } };
    // Connected again: the next request uses the cache, so say so now rather than after it.
    this.state.ok();
    return { state: 'up', details: { driver: 'redis' } };
  }

  private deleteAll(): Promise<number> {
    const entryPrefix = `${this.ns}e:`;
    return unlinkMatching(this.client, `${this.ns}*`, (key) => key.startsWith(entryPrefix));
  }

  /** Records the outcome so the outage and the recovery are each logged once. */
  private async guard<T>(command: Promise<T>): Promise<T> {
    try {
      const result = await command;
      this.state.ok();
      return result;
    } catch (error) {
      this.state.fail((error as Error).message);
      throw error;
    }
  }

  private entryKey(key: string): string {
    return `${this.ns}e:${key}`;
  }
  private lockKey(key: string): string {
    return `${this.ns}l:${key}`;
  }
  private waitKey(key: string): string {
    return `${this.ns}w:${key}`;
  }
  private tagKey(kind: 'u' | 'd' | 'm', id: string): string {
    return `${this.ns}t:${kind}:${id}`;
  }
}
