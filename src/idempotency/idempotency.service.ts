import { randomUUID } from 'node:crypto';
import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { AuditService } from '../audit/audit.service.js';
import type { CompletionCall, CompletionMeta, PacedStreamSink } from '../completion/completion.types.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { databaseStep } from '../core/deadline.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { IdempotencyRepository, type Takeover } from './idempotency.repository.js';
import type { StoredResponse, StoredRoute } from './idempotency.types.js';
import { RecordingStreamSink } from './recording-stream-sink.js';

/** API.md: "a repeat within 24 h returns the stored response". Counted from the first call. */
export const IDEMPOTENCY_WINDOW_MS = 24 * 60 * 60 * 1000;
/** Beyond what the configuration bounds (see abandonedAfterMs): event-loop stalls, clock skew between instances. */
const ABANDON_MARGIN_MS = 30_000;
/** Expired keys are deleted by the claims themselves, at most this often per instance, in batches. */
const SWEEP_EVERY_MS = 10 * 60 * 1000;
const SWEEP_BATCH = 1000;
const SWEEP_MAX_BATCHES = 10;

/**
 * How long a running claim goes without a heartbeat before it counts as abandoned (its process
 * died) and the next call takes the key over. Longer than anything a live call can go without
 * one: the claim's first heartbeat comes after a quarter of this, and before the answer a call
 * waits at most for a cache singleflight (CACHE_WAIT_MS), the budget reservation and the upstream
 * (UPSTREAM_DEADLINE_MS, all retries and fallbacks) and the answer's store, each database step
 * within DATABASE_REQUEST_TIMEOUT_MS. 175 s with the defaults.
 */
export function abandonedAfterMs(config: AppConfig): number {
  return config.upstream.retry.deadlineMs + config.cache.waitMs + 2 * config.databaseRequestTimeoutMs + ABANDON_MARGIN_MS;
}

/** What a call with an idempotency-key finds: the key for itself, or a stored answer to replay. */
export type IdempotencyOpening = { claim: IdempotencyClaim; replay?: undefined } | { claim?: undefined; replay: StoredResponse };

/**
 * `idempotency-key` on sync calls (API.md "Decisions"): the first call with a key claims it for
 * its user; a repeat within 24 h gets the stored answer (free, no upstream call), one while the
 * first still runs 409 `request_in_progress`, one with another body 422 `idempotency_key_reused`.
 * A failed call frees its key, so a retry runs again. Keys are per user, as for async submits,
 * whose keys live on their jobs; the two share one key space, so a key is refused (422) on the
 * door it was not first used on (see refuseAsyncKey).
 *
 * Only calls that carry the header come here; every step is one statement, bounded by
 * DATABASE_REQUEST_TIMEOUT_MS (503 `unavailable` past it, as for the other database steps of a request).
 */
@Injectable()
export class IdempotencyService {
  private readonly logger: Logger;
  private readonly abandonedMs: number;
  private lastSweepMs = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly repo: IdempotencyRepository,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    private readonly audit: AuditService,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Idempotency' });
    this.abandonedMs = abandonedAfterMs(config);
  }

  /**
   * Claims `key` for this call, or answers for it: the stored answer (a replay), 409 while the
   * first call runs, 422 when the key came with another request. An expired key (24 h) or an
   * abandoned claim is taken over by the claim itself.
   */
  async open(call: CompletionCall, key: string, bodyHash: string): Promise<IdempotencyOpening> {
    const userId = call.principal.userId;
    // A release may delete the row between the claim and the read, and the read may find a row
    // that turned claimable since: both claim again. Three rounds settle any such interleaving.
    for (let round = 0; round < 3; round += 1) {
      const now = this.clock.now();
      const takeover = this.takeover(now.getTime());
      const claimId = randomUUID();
      const claiming = this.repo.claim(userId, key, bodyHash, claimId, call.requestId, now, takeover);
      const claimed = await this.bounded(claiming, () => {
        // Timed out here but it may still land: then free the key at once instead of blocking it until abandoned.
        claiming.then((won) => (won ? this.repo.release(userId, key, claimId) : false)).catch(() => undefined);
      });
      if (claimed) {
        const claim = new IdempotencyClaim(
          this.repo,
          this.clock,
          this.logger,
          this.config.databaseRequestTimeoutMs,
          this.abandonedMs / 4,
          userId,
          key,
          claimId,
        );
        await this.refuseAsyncKey(claim, userId, key, takeover.expiredBefore);
        this.sweepLater(now.getTime());
        return { claim };
      }
      const row = await this.bounded(this.repo.find(userId, key));
      if (row === undefined) continue;
      if (row.state === 'running' ? row.updatedAt <= takeover.staleBefore : row.createdAt <= takeover.expiredBefore) continue;
      if (row.bodyHash !== bodyHash) {
        throw new GatewayError('idempotency_key_reused', 'This idempotency-key was already used with a different request; use a new key for a new request.', {
          param: 'idempotency-key',
        });
      }
      if (row.state === 'running' || row.response === undefined) break;
      return { replay: row.response };
    }
    throw new GatewayError('request_in_progress', 'A request with this idempotency-key is still running; retry shortly to get its answer.', {
      param: 'idempotency-key',
      headers: { 'retry-after': '1' },
    });
  }

  /**
   * Sync calls and async submits share one key space per user: a key an async job holds is
   * refused here (422), whatever the body, and the claim just taken is freed again.
   *
   * Checked after the claim, in its own statement, never before or within it: JobsService.submit
   * does the mirror image (inserts its job, then looks here for a sync claim). Each side's write
   * has committed before its read takes its snapshot, so of a sync call and an async submit that
   * race for one key the later reader always sees the other's write: at most one of them wins,
   * and in the closest race both are refused (422) and the key stays free. No lock, no
   * transaction: one more statement, and only for calls that carry a key.
   */
  private async refuseAsyncKey(claim: IdempotencyClaim, userId: string, key: string, expiredBefore: Date): Promise<void> {
    let held: boolean;
    try {
      held = await this.bounded(this.repo.heldByJob(userId, key, expiredBefore));
    } catch (error) {
      await claim.release();
      throw error;
    }
    if (!held) return;
    await claim.release();
    throw new GatewayError(
      'idempotency_key_reused',
      'This idempotency-key belongs to an async job (prefer: respond-async); a sync call cannot reuse it. Use a new key for a new request.',
      { param: 'idempotency-key' },
    );
  }

  /**
   * A replay is audited as the call it answers for, free and with no attempt, like a cache hit.
   * It is not counted in the ledger: the usage reports already count the call it repeats.
   */
  recordReplay(call: CompletionCall, response: StoredResponse): void {
    const cache = response.headers['x-gateway-cache'] ?? 'bypass';
    this.audit.recordCompletion(call, response.route, { model: response.model, cache }, [], 'idempotent_replay', 0n);
  }

  private takeover(nowMs: number): Takeover {
    return { expiredBefore: new Date(nowMs - IDEMPOTENCY_WINDOW_MS), staleBefore: new Date(nowMs - this.abandonedMs) };
  }

  private bounded<T>(work: Promise<T>, onTimeout?: () => void): Promise<T> {
    return boundedStep(work, this.config.databaseRequestTimeoutMs, onTimeout);
  }

  /** Deletes expired keys off the request path, at most every SWEEP_EVERY_MS on this instance. */
  private sweepLater(nowMs: number): void {
    if (nowMs - this.lastSweepMs < SWEEP_EVERY_MS) return;
    this.lastSweepMs = nowMs;
    void this.sweep(nowMs).catch((error: unknown) =>
      this.logger.warn({ err: (error as Error).message }, 'deleting expired idempotency keys failed; will retry'),
    );
  }

  /** Deletes expired keys now (the claims do it every few minutes); returns how many. */
  async sweep(nowMs = this.clock.nowMs()): Promise<number> {
    const takeover = this.takeover(nowMs);
    let deleted = 0;
    for (let batch = 0; batch < SWEEP_MAX_BATCHES; batch += 1) {
      const n = await this.repo.deleteExpired(takeover, SWEEP_BATCH);
      deleted += n;
      if (n < SWEEP_BATCH) break;
    }
    return deleted;
  }
}

/**
 * A key this call holds. Exactly one of `finish` (stored: its repeats are replayed) or `release`
 * (freed: a retry runs) takes effect; either stops the heartbeat that keeps a long call's claim
 * from being taken over. Neither throws: the answer is the client's either way, and a claim left
 * behind by a failed write is taken over once abandoned.
 */
export class IdempotencyClaim {
  private settled = false;
  private readonly heartbeat: NodeJS.Timeout;

  constructor(
    private readonly repo: IdempotencyRepository,
    private readonly clock: Clock,
    private readonly logger: Logger,
    private readonly timeoutMs: number,
    heartbeatMs: number,
    private readonly userId: string,
    private readonly key: string,
    private readonly claimId: string,
  ) {
    this.heartbeat = setInterval(() => this.beat(), heartbeatMs);
    // A claim must never keep a process alive; one left running by an exit is taken over later.
    this.heartbeat.unref();
  }

  async finish(response: StoredResponse): Promise<void> {
    if (!this.stop()) return;
    try {
      const stored = await boundedStep(this.repo.finish(this.userId, this.key, this.claimId, this.clock.now(), response), this.timeoutMs);
      if (!stored) this.logger.warn({ key: this.key }, 'idempotency claim was taken over before its answer was stored');
    } catch (error) {
      this.logger.error({ key: this.key, err: (error as Error).message }, 'storing an idempotent answer failed; its key stays claimed until abandoned');
    }
  }

  async release(): Promise<void> {
    if (!this.stop()) return;
    try {
      await boundedStep(this.repo.release(this.userId, this.key, this.claimId), this.timeoutMs);
    } catch (error) {
      this.logger.error({ key: this.key, err: (error as Error).message }, 'releasing an idempotency key failed; it stays claimed until abandoned');
    }
  }

  /** Wraps a stream's sink so the stream can be stored once it completed (see endStream). */
  recordStream(sink: PacedStreamSink): RecordingStreamSink {
    return new RecordingStreamSink(sink);
  }

  /**
   * After the pipeline is done with the stream: stores it when it completed whole (with the
   * headers the door sent for `meta`), else frees the key; then sends the `[DONE]` the recorder held back, so the stored answer exists before the
   * client sees the end of the stream.
   */
  async endStream(recorder: RecordingStreamSink, headersOf: (meta: CompletionMeta) => Record<string, string>): Promise<void> {
    const recorded = recorder.recorded();
    try {
      if (recorded === undefined) {
        await this.release();
      } else {
        const { meta, events } = recorded;
        await this.finish({ kind: 'sse', events, headers: headersOf(meta), model: meta.model, route: storedRoute(meta.route) });
      }
    } finally {
      recorder.end();
    }
  }

  private stop(): boolean {
    clearInterval(this.heartbeat);
    if (this.settled) return false;
    this.settled = true;
    return true;
  }

  private beat(): void {
    this.repo.heartbeat(this.userId, this.key, this.claimId, this.clock.now()).then(
      (held) => {
        if (!held && !this.settled) this.logger.warn({ key: this.key }, 'idempotency claim was taken over while its call still runs');
      },
      (error: unknown) => this.logger.warn({ key: this.key, err: (error as Error).message }, 'idempotency heartbeat failed'),
    );
  }
}

/** The route as a stored answer keeps it: what its replay's audit row names. */
export function storedRoute(route: ResolvedRoute): StoredRoute {
  return { requestedTaskType: route.requestedTaskType, ruleTaskType: route.ruleTaskType, version: route.version };
}

function boundedStep<T>(work: Promise<T>, ms: number, onTimeout?: () => void): Promise<T> {
  return databaseStep(work, ms, (timedOut) => timedOut, onTimeout).catch((cause: unknown) => {
    throw new GatewayError('unavailable', 'The gateway cannot check idempotency keys right now (database unavailable).', { cause });
  });
}
