import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { StoreDriver } from '../config/config.js';
import type { Clock } from '../core/clock.js';
import { FallbackState } from '../redis/fallback-state.js';
import { LuaScript } from '../redis/lua-script.js';
import type { RedisCommands } from '../redis/resp-client.js';
import { escapeGlob, unlinkMatching } from '../redis/unlink-matching.js';
import { ExpiringEntries } from './expiring-entries.js';
import { type CacheFilter, type CacheLookup, type CachePeek, ResponseCache, type CacheTags } from './response-cache.js';

// Entry or lock in one round trip. Returns {1, body, pttl} hit, {0} miss, {2} lead, {3} wait. A
// caller told to wait leaves a mark (KEYS[3]) so that the fill or release says so on the channel.
const LOOKUP = new LuaScript(
  `local v = redis.call('HGET', KEYS[1], 'b')
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if ARGV[1] == '0' then return {0} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return {2} end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
return {3}`,
  'cache-lookup',
);

// Returns {1, body} when the answer landed (or, KEYS[4], was handed over by a leader that may
// not store it), {3} while the lock is held (renewing the waiter's mark for the lock's lifetime:
// an earlier announcement consumed it), {4} when it is gone.
const PEEK = new LuaScript(
  `local v = redis.call('HGET', KEYS[1], 'b')
if v then return {1, v} end
local t = redis.call('PTTL', KEYS[2])
if t > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', t)
  return {3}
end
local h = redis.call('GET', KEYS[4])
if h then return {1, h} end
return {4}`,
  'cache-peek',
);

// Entry, index and (when the token still holds it) lock release, atomically. The entry is a hash:
// the body (b) and who it belongs to (u, d, and m:<model> per model), which a delete checks,
// since an index may still list a key another user or model has filled since. The old entry goes
// first, or an overwrite would keep its models. Index members are scored by their entry's
// expiry, and each fill prunes the expired ones: an index of a busy model, kept alive by every
// fill, would otherwise collect every key ever cached there. Instances waiting on this key
// (their mark, KEYS[3]) hear it on the channel at once.
// KEYS: entry, lock, wait mark, index by user, by department, by model...; ARGV: body, ttl ms,
// token, channel, key, user, department, model...
const STORE = new LuaScript(
  `redis.call('DEL', KEYS[1])
local fields = {'b', ARGV[1], 'u', ARGV[6], 'd', ARGV[7]}
for i = 8, #ARGV do
  fields[#fields + 1] = 'm:' .. ARGV[i]
  fields[#fields + 1] = '1'
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + ttl, KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1`,
  'cache-store',
);

// Deletes the listed entries that still match every filter, and takes out of each filter's
// index the entries that no longer belong there (expired, or refilled by someone else).
// KEYS: the filters' indexes (ARGV[1] of them), then the entries; ARGV: n, then per index the
// entry field it stands for and the value that field must hold.
const DELETE = new LuaScript(
  `local n = tonumber(ARGV[1])
local deleted = 0
for k = n + 1, #KEYS do
  local entry = KEYS[k]
  local matched = true
  local stale = {}
  for i = 1, n do
    if redis.call('HGET', entry, ARGV[2 * i]) ~= ARGV[2 * i + 1] then
      matched = false
      stale[i] = true
    end
  end
  if matched then deleted = deleted + redis.call('UNLINK', entry) end
  for i = 1, n do
    if matched or stale[i] then redis.call('ZREM', KEYS[i], entry) end
  end
end
return deleted`,
  'cache-delete',
);

// Compare-and-delete: a leader whose lock expired must not free the lock of the one after it.
// Waiting instances are told, so that one of them leads at once instead of at its next poll, or
// takes the answer handed over (ARGV[4], for ARGV[5] ms; only written when someone waits).
const RELEASE = new LuaScript(
  `if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('DEL', KEYS[2]) == 1 then
    if ARGV[4] then redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5]) end
    redis.call('PUBLISH', ARGV[2], ARGV[3])
  end
  return 1
end
return 0`,
  'cache-release',
);

const DELETE_BATCH = 500;
/**
 * How long an answer handed over to waiters stays readable: they are woken by its announcement,
 * or look again within 500 ms without it. Kept short because it is an answer a purge voided.
 */
const HANDOFF_MS = 2_000;

/** The subscriber connection as the cache sees it: its state, and (a RespClient) its events. */
export interface NearListener {
  readonly status: string;
  on?(event: 'ready' | 'close', listener: () => void): unknown;
}

/**
 * Published on the landed channel before a delete (every instance stops storing the fills it
 * has in flight: `onPurge`) and, with near copies, after it too (every instance drops its
 * copies). Cache keys are hex digests, so no landed key can be mistaken for it.
 */
export const NEAR_FLUSH = '*flush';

/** What one instance keeps near, whatever CACHE_MAX_ENTRIES and CACHE_MAX_BYTES allow the memory driver. */
const NEAR_MAX_ENTRIES = 1000;
const NEAR_MAX_CHARS = 16 * 1024 * 1024;

export interface NearOptions {
  readonly clock: Clock;
  /** How long a near copy answers without asking Redis (capped by the entry's own TTL). */
  readonly maxAgeMs: number;
  readonly maxEntries: number;
  /** Total length of the near bodies, in characters. */
  readonly maxChars: number;
}

/** The near copies' bounds for a configuration: the memory driver's, capped at NEAR_MAX_*. */
export function nearOptions(clock: Clock, cache: { nearMs: number; maxEntries: number; maxBytes: number }): NearOptions | undefined {
  if (cache.nearMs <= 0) return undefined;
  return { clock, maxAgeMs: cache.nearMs, maxEntries: Math.min(cache.maxEntries, NEAR_MAX_ENTRIES), maxChars: Math.min(cache.maxBytes, NEAR_MAX_CHARS) };
}

/**
 * The shared cache of every instance. Keys: `<prefix>cache:e:<hash>` (entry: a hash of the body
 * and its owner, see STORE), `cache:l:<hash>` (singleflight fill lock, with a random token),
 * `cache:w:<hash>` (another instance waits for this fill), `cache:h:<hash>` (an answer a purge
 * kept out of the cache, handed to those waiting for it), `cache:i:{u|d|m}:<id>` (sorted sets
 * of entry keys by user, department and model, scored by expiry, for `DELETE /admin/cache`). A
 * fill or release that finds a waiter publishes the hash on `<prefix>cache:landed`; `landed()`
 * takes those messages (RedisConnections.subscriber) and `watch()` hands them to the waiting
 * poll loop. While the connection is not ready, `available()` is false and callers bypass the
 * cache.
 *
 * **Near copies** (`near`): an entry this instance read or wrote is kept in its memory too, for
 * at most `maxAgeMs` and never past the entry's TTL, and a lookup answers from it without a round
 * trip. A delete (`DELETE /admin/cache`) drops them everywhere: the instance that deletes
 * publishes NEAR_FLUSH, and every instance, itself included, drops all its copies when it hears
 * it. Copies are only used while the subscriber connection is up, and dropped whenever it goes
 * down or comes back, because a delete published meanwhile was not heard. Each of those drops
 * is also reported to `onPurge`: a fill in flight across it is not stored.
 */
export class RedisResponseCache extends ResponseCache {
  readonly driver: StoreDriver = 'redis';
  private readonly state: FallbackState;
  private readonly ns: string;
  /** The channel fills and releases are announced on when another instance waits for them. */
  readonly landedChannel: string;
  private readonly watchers = new Map<string, Set<() => void>>();
  /** The connection that hears the landed channel; without it (or while it is down) nobody is told. */
  private listener: NearListener | undefined;
  /** Bumped whenever the near copies are dropped; a read sent before a drop keeps no copy. */
  private nearEpoch = 0;
  /** key → near copy body, bounded by count and characters; the oldest copy goes first. */
  private readonly nearCopies: ExpiringEntries<string> | undefined;
  private readonly purgeListeners: Array<() => void> = [];

  constructor(
    private readonly client: RedisCommands,
    keyPrefix: string,
    logger: Logger,
    private readonly near: NearOptions | undefined = undefined,
  ) {
    super();
    this.ns = `${keyPrefix}cache:`;
    this.landedChannel = `${this.ns}landed`;
    this.state = new FallbackState(logger, { degraded: 'Redis unavailable: response cache bypassed', recovered: 'Redis back: response cache in use again' });
    this.nearCopies = near ? new ExpiringEntries(near.maxEntries, near.maxChars) : undefined;
  }

  lookup(key: string, lockMs: number): Promise<CacheLookup> {
    const near = this.nearInUse();
    const body = near ? this.nearCopies?.get(key, near.clock.nowMs()) : undefined;
    if (body !== undefined) return Promise.resolve({ kind: 'hit', body });
    return this.lookupRemote(key, lockMs);
  }

  private async lookupRemote(key: string, lockMs: number): Promise<CacheLookup> {
    const token = lockMs > 0 ? randomUUID() : '';
    const epoch = this.nearEpoch;
    const reply = await this.guard(LOOKUP.run(this.client, [this.entryKey(key), this.lockKey(key), this.waitKey(key)], [Math.max(0, Math.ceil(lockMs)), token]));
    const [code, body, ttl] = reply as [number, string | undefined, number | undefined];
    switch (code) {
      case 1:
        // Not kept when the copies were dropped while this read was out: Redis may have read the
        // entry just before a delete whose flush this instance has already heard.
        if (epoch === this.nearEpoch) this.keepNear(key, body ?? '', Number(ttl));
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
    const [code, body] = (await this.guard(PEEK.run(this.client, [this.entryKey(key), this.lockKey(key), this.waitKey(key), this.handoffKey(key)], []))) as [
      number,
      string | undefined,
    ];
    if (code === 1) return { kind: 'hit', body: body ?? '' };
    return code === 3 ? { kind: 'wait' } : { kind: 'free' };
  }

  async store(key: string, body: string, ttlMs: number, tags: CacheTags, token?: string): Promise<void> {
    if (ttlMs <= 0) {
      if (token !== undefined) await this.release(key, token);
      return;
    }
    const indexKeys = [this.indexKey('u', tags.userId), this.indexKey('d', tags.departmentId), ...tags.models.map((m) => this.indexKey('m', m))];
    // Nobody reads the reply, and a fill never fails a request: where the connection can skip
    // it, Redis sends none, which spares the gateway a wakeup per miss (BENCHMARKS.md, session 8).
    await this.guard(
      STORE.fire(
        this.client,
        [this.entryKey(key), this.lockKey(key), this.waitKey(key), ...indexKeys],
        [body, Math.ceil(ttlMs), token ?? '', this.landedChannel, key, tags.userId, tags.departmentId, ...tags.models],
      ),
    );
    // Only what was sent to Redis: a copy of a fill that failed would answer what nobody else can.
    this.keepNear(key, body, ttlMs);
  }

  async release(key: string, token: string, handoff?: string): Promise<boolean> {
    const args = handoff === undefined ? [token, this.landedChannel, key] : [token, this.landedChannel, key, handoff, HANDOFF_MS];
    return (await this.guard(RELEASE.run(this.client, [this.lockKey(key), this.waitKey(key), this.handoffKey(key)], args))) === 1;
  }

  /** Hands over the subscriber connection (RedisConnections.subscriber) that calls `landed`. */
  listenWith(listener: NearListener): void {
    this.listener = listener;
    // A delete published while it was down went unheard: the near copies may be stale.
    listener.on?.('close', () => this.clearNear());
    listener.on?.('ready', () => this.clearNear());
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
    if (key === NEAR_FLUSH) {
      this.clearNear();
      return;
    }
    const set = this.watchers.get(key);
    if (!set) return;
    this.watchers.delete(key);
    for (const wake of set) wake();
  }

  async invalidate(filter: CacheFilter): Promise<number> {
    // Near copies carry no tags, so a delete of any kind drops them all, here and (published
    // once the entries are gone from Redis) on every other instance. Published before the delete
    // too, near copies or not: other instances then stop storing fills that began before it,
    // which a delete that scans for a while would otherwise miss or be undone by.
    this.clearNear();
    await this.guard(this.client.call('PUBLISH', this.landedChannel, NEAR_FLUSH));
    const deleted = await this.deleteMatching(filter);
    if (this.near) await this.guard(this.client.call('PUBLISH', this.landedChannel, NEAR_FLUSH));
    return deleted;
  }

  private async deleteMatching(filter: CacheFilter): Promise<number> {
    // Each index with the entry field it stands for; the first is read (a user's is the smallest).
    const indexes: Array<[string, string, string]> = [];
    if (filter.userId !== undefined) indexes.push([this.indexKey('u', filter.userId), 'u', filter.userId]);
    if (filter.departmentId !== undefined) indexes.push([this.indexKey('d', filter.departmentId), 'd', filter.departmentId]);
    if (filter.model !== undefined) indexes.push([this.indexKey('m', filter.model), `m:${filter.model}`, '1']);
    const first = indexes[0];
    if (first === undefined) return this.guard(this.deleteAll());
    const members = (await this.guard(this.client.call('ZRANGE', first[0], 0, -1))) as string[];
    const keys = indexes.map(([index]) => index);
    const checks = [indexes.length, ...indexes.flatMap(([, field, value]) => [field, value])];
    let deleted = 0;
    for (let i = 0; i < members.length; i += DELETE_BATCH) {
      deleted += (await this.guard(DELETE.run(this.client, [...keys, ...members.slice(i, i + DELETE_BATCH)], checks))) as number;
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
    // Connected, after a failure: up once a write goes through, this harmless one (so that an
    // instance without traffic finds out too) or a request's. Each check sends at most one.
    this.state.recheck(() => this.client.call('SET', `${this.ns}probe`, '1', 'PX', 10_000));
    if (this.state.degraded) return { state: 'degraded', details: { driver: 'redis', mode: 'bypassed where a command fails', ...this.state.describe() } };
    // How many entries answer here without a round trip, or why none do.
    const near = !this.nearCopies ? 'off' : this.nearInUse() ? this.nearCopies.size : 'unused while the subscriber is down';
    return { state: 'up', details: { driver: 'redis', near_copies: near } };
  }

  /**
   * Entries only: the fill locks and wait marks of requests in flight stay, or an identical
   * request on another instance would lead a second upstream call. Indexes stay too (unlinked
   * mid-scan, a fill landing meanwhile could keep its entry but lose its index, out of reach of a
   * filtered delete); what they still list of the purged entries, a filtered delete takes out.
   */
  private deleteAll(): Promise<number> {
    return unlinkMatching(this.client, `${escapeGlob(this.ns)}e:*`);
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

  /** The near options while copies may be used: configured, and the delete flushes can be heard. */
  private nearInUse(): NearOptions | undefined {
    return this.listener?.status === 'ready' ? this.near : undefined;
  }

  /** Read order does not matter here: a copy lives at most `maxAgeMs`, so the oldest goes first. */
  private keepNear(key: string, body: string, ttlMs: number): void {
    const near = this.nearInUse();
    if (near && ttlMs > 0) this.nearCopies?.set(key, body, body.length, near.clock.nowMs() + Math.min(ttlMs, near.maxAgeMs));
  }

  override onPurge(listener: () => void): void {
    this.purgeListeners.push(listener);
  }

  /** Every drop is a purge this instance heard of, made, or may have missed (see the class doc). */
  private clearNear(): void {
    this.nearEpoch++;
    this.nearCopies?.clear();
    for (const listener of this.purgeListeners) listener();
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
  private handoffKey(key: string): string {
    return `${this.ns}h:${key}`;
  }
  private indexKey(kind: 'u' | 'd' | 'm', id: string): string {
    return `${this.ns}i:${kind}:${id}`;
  }
}
