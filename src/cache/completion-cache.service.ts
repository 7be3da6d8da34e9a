import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';
import type { CacheStatus, CompletionCall } from '../completion/completion.types.js';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { hasMessage, reportsFailure } from '../upstream/llm-client.js';
import { type CachedAnswer, decodeCacheEntry, encodeCacheEntry } from './cache-entry.js';
import { type CachePlan, cachePlan } from './cache-key.js';
import { ExpiringEntries } from './expiring-entries.js';
import { type CacheFilter, ResponseCache, type CacheTags } from './response-cache.js';

export type { CachedAnswer } from './cache-entry.js';

/**
 * What the pipeline holds between the cache read and the cache write. `fill`/`fillFromStream`
 * after a complete answer, `abandon` after anything else (error, cut stream, client gone):
 * exactly one of them, so the fill lock is released and waiters go ahead. None of them throws.
 */
export interface CacheTicket {
  readonly status: CacheStatus;
  /** Set on a hit: answer from here, at no cost, without calling the upstream. */
  readonly hit: CachedAnswer | undefined;
  /** true when `fill`/`fillFromStream` would store the answer: only then is a stream assembled. */
  readonly fills: boolean;
  /** `recordedModel`: the model the miss was recorded as (the one asked for), which its hits are recorded as too. */
  fill(raw: string, completion: ChatCompletion, recordedModel?: string): Promise<void>;
  /**
   * A finished stream's answer as StreamAssembler built it from the events the pipeline parsed
   * anyway; undefined when the stream cannot be replayed (then it is `abandon`).
   */
  fillFromStream(completion: ChatCompletion | undefined, recordedModel?: string): Promise<void>;
  abandon(): void;
}

/** The in-process half of singleflight: every identical request of this instance awaits one promise. */
/**
 * What a leader settles its flight with, and hands over to other instances' waiters, when it
 * answered but its answer cannot be stored (a stream whose deltas a replay cannot render:
 * `reasoning_details`, `annotations`, `images`). Its followers then go on at once, together, as
 * plain misses: handed the lead one after the other, as after a failure, each would have waited
 * for the one before it, whose answer could not be stored either. Never an entry (entries begin
 * with their header line).
 */
const UNSTORABLE = '\u0000unstorable';

class Flight {
  /** The stored entry, UNSTORABLE, or undefined when the leader gave up without an answer. */
  readonly done: Promise<string | undefined>;
  settle!: (body: string | undefined) => void;
  constructor() {
    this.done = new Promise((resolve) => {
      this.settle = resolve;
    });
  }
}

const POLL_FIRST_MS = 10;
const POLL_MAX_MS = 100;
/** Between looks while the store announces fills: only a safety net for a lost announcement. */
const POLL_WATCHED_MS = 500;
/**
 * Bounds of the decoded answers kept for hot entries (entries, and characters of their stored
 * text; what is kept is about three times that: the body, its parse and a replay).
 */
const DECODED_MAX_ENTRIES = 256;
const DECODED_MAX_CHARS = 1024 * 1024;

const BYPASS: CacheTicket = {
  status: 'bypass',
  hit: undefined,
  fills: false,
  fill: () => Promise.resolve(),
  fillFromStream: () => Promise.resolve(),
  abandon: () => undefined,
};

/**
 * A caller whose client left while it waited: it neither leads nor stores. Its call then ends as
 * any call whose client left before the upstream answered (client_closed), before any attempt.
 */
const LEFT: CacheTicket = { ...BYPASS, status: 'miss' };

/**
 * The cache stage of the pipeline: decides whether a call may use the cache, reads it, and makes
 * N identical concurrent misses cost one upstream call (singleflight). Within an instance the
 * followers await the leader's promise (a leader that gives up hands the lead to one of them);
 * across instances the store's fill lock (Redis SET NX PX with a random token) elects one leader
 * and the others wait until its answer lands (announced on Redis, with polling as the fallback),
 * the lock disappears (leader failed: try to lead) or their bounded wait runs out (call the
 * upstream themselves). A store that fails makes the call a
 * bypass; it never fails the request.
 */
@Injectable()
export class CompletionCache {
  private readonly flights = new Map<string, Flight>();
  /**
   * The answer last decoded for each key, with the entry text it came from. A hit on a hot entry
   * (the store hands back the same text: the near copy, or the memory driver's string) reuses it,
   * with its parsed completion and rendered replay, instead of decoding, parsing and rendering
   * again on every hit. Oldest first out; nothing to expire, since an answer is only reused for
   * the very text it was decoded from.
   */
  private readonly decoded = new ExpiringEntries<{ entry: string; answer: CachedAnswer }>(DECODED_MAX_ENTRIES, DECODED_MAX_CHARS);
  /**
   * Bumped by every purge this instance makes, and every one the store hears of from another
   * instance (or may have missed: `onPurge`). A fill compares it with its value when its miss
   * began: an answer generated across a purge may be just what the admin purged (a bad batch, a
   * model changed behind the same id), so it goes to the callers waiting for it but is not
   * stored, or the purge would be undone as soon as the call ends. Any purge counts, whatever
   * its filter: purges are rare, and voiding an unrelated fill costs one more upstream call for
   * that key, where matching filters would need the filters kept, and sent between instances.
   * Across instances (Redis) this relies on the store's flush announcement, published before the
   * delete runs: a fill of another instance that reaches Redis before that instance has heard it
   * (well under a millisecond, or longer while its subscriber reconnects, after which it counts
   * as a purge) can still be stored.
   */
  private purges = 0;
  private readonly logger: Logger;
  private readonly ttlSeconds: number;
  private readonly waitMs: number;

  constructor(
    private readonly store: ResponseCache,
    config: AppConfig,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Cache' });
    this.ttlSeconds = config.cache.defaultTtlSeconds;
    this.waitMs = config.cache.waitMs;
    store.onPurge(() => {
      this.purges++;
    });
  }

  /** Identical requests currently waiting on a leader in this instance (for tests and metrics). */
  get inFlight(): number {
    return this.flights.size;
  }

  async open(call: CompletionCall, route: ResolvedRoute): Promise<CacheTicket> {
    const plan = cachePlan(call, route, this.ttlSeconds);
    if (typeof plan === 'string' || !this.store.available()) return BYPASS;
    const tags: CacheTags = { userId: call.principal.userId, departmentId: call.principal.departmentId, models: route.models };
    try {
      if (!plan.read) return this.miss(plan, tags, undefined);
      if (!plan.write) {
        const found = await this.store.lookup(plan.key, 0);
        return found.kind === 'hit' ? this.hit(found.body, plan, tags) : { ...BYPASS, status: 'miss' };
      }
      return await this.singleflight(plan, tags, call.signal);
    } catch (error) {
      this.logger.debug({ reqId: call.requestId, err: (error as Error).message }, 'cache read failed; bypassing');
      return BYPASS;
    }
  }

  /** Admin invalidation; unlike the request path, an unreachable store is an error here. */
  async invalidate(filter: CacheFilter): Promise<number> {
    const unavailable = (cause?: unknown) => new GatewayError('unavailable', 'The cache store is unreachable; nothing was deleted.', { cause });
    if (!this.store.available()) throw unavailable();
    // Before the delete: a fill of this instance that lands while it runs is voided too.
    this.purges++;
    // Not needed for correctness (a changed entry is decoded anew); the memory is.
    this.decoded.clear();
    try {
      return await this.store.invalidate(filter);
    } catch (cause) {
      throw unavailable(cause);
    }
  }

  private async singleflight(plan: CachePlan, tags: CacheTags, signal: AbortSignal): Promise<CacheTicket> {
    const deadline = Date.now() + this.waitMs;
    for (;;) {
      const existing = this.flights.get(plan.key);
      if (!existing) return this.lead(plan, tags, signal, deadline);
      const outcome = await waitFor(existing.done, deadline, signal);
      if (outcome === 'aborted') return LEFT;
      if (outcome === 'timeout') {
        // Waited out: the flight no longer holds the key, as a fill lock on Redis expires after
        // the same time, so the next identical call leads anew instead of waiting it out too (its
        // leader's own finish leaves a newer flight alone).
        if (this.flights.get(plan.key) === existing) this.flights.delete(plan.key);
        // The leader is taking too long: go on alone (and still store what we get).
        return this.miss(plan, tags, undefined);
      }
      if (outcome === UNSTORABLE) return this.miss(plan, tags, undefined);
      // An entry (never the text 'timeout' or 'aborted': it starts with its header line).
      if (outcome !== undefined) return this.hit(outcome, plan, tags);
      // The leader gave up without an answer. Its followers resume one after the other in this
      // turn: the first finds the key free and leads (a new flight, set before its first await),
      // the others wait on it, within their first deadline, instead of all calling the upstream
      // at once. A leader that fails for everyone (the body's 400) so passes the turn along the
      // queue, one failed call at a time. Its finish has freed the key; this only guards against
      // a settled flight left behind, which would make this loop spin.
      if (this.flights.get(plan.key) === existing) this.flights.delete(plan.key);
    }
  }

  /** No identical call in flight here: this one leads, unless another instance is filling the key. */
  private async lead(plan: CachePlan, tags: CacheTags, signal: AbortSignal, deadline: number): Promise<CacheTicket> {
    const flight = new Flight();
    this.flights.set(plan.key, flight);
    const finish = (body: string | undefined) => {
      if (this.flights.get(plan.key) === flight) this.flights.delete(plan.key);
      flight.settle(body);
    };
    try {
      for (;;) {
        const found = await this.store.lookup(plan.key, this.waitMs);
        if (found.kind === 'hit') {
          finish(found.body);
          return found.body === UNSTORABLE ? this.miss(plan, tags, undefined) : this.hit(found.body, plan, tags);
        }
        if (found.kind === 'lead') return this.miss(plan, tags, { flight: finish, token: found.token });
        if (found.kind === 'miss') return this.miss(plan, tags, { flight: finish, token: undefined });
        // Another instance is filling this key.
        const outcome = await this.poll(plan.key, deadline, signal);
        if (outcome === 'free') continue;
        if (outcome === 'aborted') {
          // Its client left: a follower here leads in its place at once.
          finish(undefined);
          return LEFT;
        }
        if (outcome === 'timeout') return this.miss(plan, tags, { flight: finish, token: undefined });
        finish(outcome.body);
        return outcome.body === UNSTORABLE ? this.miss(plan, tags, undefined) : this.hit(outcome.body, plan, tags);
      }
    } catch (error) {
      finish(undefined);
      throw error;
    }
  }

  /**
   * Waits for another instance's fill: a look after each sleep, cut short when the fill (or the
   * leader giving up) is announced on Redis, so the answer is taken when it lands. Announcements
   * are hints (lost while the subscriber reconnects); the sleeps keep this correct without them.
   */
  private async poll(key: string, deadline: number, signal: AbortSignal): Promise<{ body: string } | 'free' | 'timeout' | 'aborted'> {
    let delay = POLL_FIRST_MS;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) return 'timeout';
      const watch = this.store.watch(key);
      const nap = sleep(Math.min(delay, left));
      const slept = await waitFor(watch ? Promise.race([nap, watch.landed]) : nap, deadline, signal);
      watch?.cancel();
      if (slept === 'aborted') return 'aborted';
      const seen = await this.store.peek(key);
      if (seen.kind === 'hit') return { body: seen.body };
      if (seen.kind === 'free') return 'free';
      // The first look comes soon either way: it catches a fill announced before the watch began.
      delay = watch ? POLL_WATCHED_MS : Math.min(delay * 2, POLL_MAX_MS);
    }
  }

  private hit(entry: string, plan: CachePlan, tags: CacheTags): CacheTicket {
    const answer = this.decode(plan.key, entry);
    // A corrupt entry is a miss that overwrites it.
    if (!answer) return this.miss(plan, tags, undefined);
    return { ...BYPASS, status: 'hit', hit: answer };
  }

  private decode(key: string, entry: string): CachedAnswer | undefined {
    const known = this.decoded.get(key, 0);
    // Usually the same string object (a pointer compare); a remote read compares the text.
    if (known !== undefined && known.entry === entry) return known.answer;
    const answer = decodeCacheEntry(entry);
    if (answer !== undefined) this.decoded.set(key, { entry, answer }, entry.length, Number.POSITIVE_INFINITY);
    return answer;
  }

  /**
   * A miss that will call the upstream. `lead` is set for the singleflight leader: its fill or
   * abandon settles the local followers and frees the lock for other instances.
   */
  private miss(plan: CachePlan, tags: CacheTags, lead: { flight: (body: string | undefined) => void; token: string | undefined } | undefined): CacheTicket {
    let settled = false;
    const generation = this.purges;
    // Ends the flight without storing: `undefined` (gave up: the lead passes on) or UNSTORABLE.
    const endUnstored = (outcome: typeof UNSTORABLE | undefined) => {
      if (settled) return;
      settled = true;
      lead?.flight(outcome);
      if (lead?.token !== undefined) this.release(plan.key, lead.token, outcome);
    };
    const abandon = () => endUnstored(undefined);
    const fill = async (raw: string, completion: ChatCompletion, recordedModel?: string) => {
      if (settled) return;
      // Stored only if every replay can render it (a choice without a message would fail each stream
      // hit), and only if it is an answer: one that reports a failure (a top-level error, a choice
      // finished as "error") is relayed at most, never served again.
      if (
        !plan.write ||
        !Array.isArray(completion.choices) ||
        completion.choices.length === 0 ||
        !completion.choices.every(hasMessage) ||
        reportsFailure(completion)
      ) {
        return abandon();
      }
      settled = true;
      const entry = encodeCacheEntry(raw, completion, recordedModel);
      lead?.flight(entry);
      if (generation !== this.purges) {
        // Purged while it was generated (see `purges`): not stored, but its waiters get it,
        // here through the flight and on other instances through the store's handoff.
        if (lead?.token !== undefined) this.release(plan.key, lead.token, entry);
        return;
      }
      const models = completion.model && !tags.models.includes(completion.model) ? [...tags.models, completion.model] : tags.models;
      try {
        await this.store.store(plan.key, entry, plan.ttlMs, { ...tags, models }, lead?.token);
      } catch (error) {
        this.logger.debug({ err: (error as Error).message }, 'cache write failed');
      }
    };
    return {
      status: 'miss',
      hit: undefined,
      fills: plan.write,
      fill,
      fillFromStream: (completion, recordedModel) => {
        if (!completion) {
          // Without `write` nothing was assembled: a follower that may store leads next, as usual.
          if (plan.write) endUnstored(UNSTORABLE);
          else abandon();
          return Promise.resolve();
        }
        return fill(JSON.stringify(completion), completion, recordedModel);
      },
      abandon,
    };
  }

  private release(key: string, token: string, handoff: string | undefined): void {
    this.store.release(key, token, handoff).catch((error: unknown) => this.logger.debug({ err: (error as Error).message }, 'cache lock release failed'));
  }
}

/** Resolves with the promise's value, or 'timeout' at the deadline, or 'aborted' when the client leaves. */
function waitFor<T>(promise: Promise<T>, deadline: number, signal: AbortSignal): Promise<T | 'timeout' | 'aborted'> {
  if (signal.aborted) return Promise.resolve('aborted');
  return new Promise((resolve) => {
    const timer = setTimeout(() => done('timeout'), Math.max(0, deadline - Date.now()));
    const onAbort = () => done('aborted');
    signal.addEventListener('abort', onAbort, { once: true });
    function done(value: T | 'timeout' | 'aborted') {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      resolve(value);
    }
    promise.then(done, () => done('timeout'));
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
