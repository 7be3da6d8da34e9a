import { randomUUID } from 'node:crypto';
import { Injectable, type OnApplicationShutdown, type OnModuleInit, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import { formatUsd, type Nanos } from '../../libs/money/src/index.js';
import { AppConfig } from '../config/config.js';
import { BatchWriter } from '../core/batch-writer.js';
import { Clock } from '../core/clock.js';
import { GatewayError } from '../core/errors.js';
import { isoTime } from '../core/iso-time.js';
import { AppLogger } from '../core/logger.js';
import { isDataError } from '../database/sql-errors.js';
import { ReadinessRegistry, type ReadinessReport } from '../health/readiness.js';
import { ShutdownService } from '../lifecycle/shutdown.service.js';
import type { CostSource } from '../upstream/pricing/pricing.js';
import { BudgetDatabase, type BudgetStatement } from './budget-database.js';
import { FLUSH_SQL } from './budget-sql.js';
import { periodStarts } from './periods.js';

/** One usage_ledger row as FLUSH_SQL reads it (jsonb: bigints travel as strings). */
export interface LedgerEntry {
  charge_id: string;
  request_id: string;
  attempt: number;
  key_id: string | null;
  user_id: string;
  department_id: string;
  model: string;
  prompt_tokens: number;
  completion_tokens: number;
  cost_nanos: string;
  cost_source: CostSource;
  status: number | null;
  outcome: string;
  cache: string | null;
  task_type: string | null;
  door: string;
  /** ISO time of the settle (not of the flush): the period it is charged to. */
  created_at: string;
  /** The lease a draw's worst case came from: its cost is taken off what the lease row holds. */
  lease_id?: string;
  /** Set on a row that counts cache hits instead of charging a call (see recordCacheHit). */
  cache_hits?: number;
}

/** What a cache hit adds to the ledger: the row it is counted into, less the count. */
export interface CacheHitEntry {
  requestId: string;
  keyId: string | null;
  userId: string;
  departmentId: string;
  model: string;
  taskType: string | null;
  door: string;
  promptTokens: number;
  completionTokens: number;
  at: Date;
}

/** A reservation the flush deletes, giving back what it held. */
export interface PendingRelease {
  id: string;
  userId: string;
  departmentId: string;
  /**
   * Set to give back only this much of what a lease row holds, keeping the row: a lease retired
   * while draws are still in flight keeps what they may cost until the last one settles.
   */
  nanos?: Nanos;
}

/** A settle (its reservation, if it holds one, and one row per attempt) or a count of cache hits (one row). */
export interface PendingCharge {
  release: PendingRelease | undefined;
  rows: readonly LedgerEntry[];
  /** Set while a count of cache hits may still grow: its key in BudgetWriter's open counts. */
  hitGroup?: string;
}

export interface BudgetWriterStats {
  buffered: number;
  written: number;
  failing: boolean;
  lastError: string | undefined;
}

/** Beyond this many charges waiting (the database refusing writes for a long time) reservations are refused. */
export const MAX_BUFFERED = 100_000;
const MAX_BACKOFF_MS = 5000;
/** How long the shutdown waits for the budget's pools to end (see onApplicationShutdown). */
const POOL_CLOSE_WAIT_MS = 500;
/** A count of hits is closed at this many (a new row opens), so its token sums stay far inside `integer`. */
const MAX_HITS_PER_ROW = 10_000;
/** Nor does a count take a hit that would take its prompt plus completion tokens past this (a new row opens). */
const MAX_TOKENS_PER_ROW = 1_000_000_000;
const FLUSH: BudgetStatement = { name: 'gatehouse_budget_flush', text: FLUSH_SQL };

/**
 * Stores settles and cache-hit ledger rows off the request path: `enqueue()` only pushes onto an
 * in-memory buffer; a writer stores it with ONE statement per batch (FLUSH_SQL) every
 * `BUDGET_FLUSH_MS`, or as soon as `BUDGET_FLUSH_BATCH` charges wait, and drains it on shutdown
 * (the scheduling, backoff and logging are BatchWriter's, shared with AuditService).
 *
 * Nothing is lost while the database is away: batches are retried with backoff, and a retry
 * cannot charge twice (FLUSH_SQL is idempotent). The buffer is bounded: when it is full,
 * `assertAccepting` makes new reservations fail closed (503) rather than letting calls run whose
 * cost could not be recorded. A batch the database rejects for its data (not for being away) is
 * split until the one bad charge is found; that charge is logged in full and set aside, so it
 * cannot wedge everything behind it.
 *
 * Until its charge is stored, a finished request's reservation still holds its worst case (at
 * least the actual cost): delay can refuse a request too early, never let one overspend.
 */
@Injectable()
export class BudgetWriter implements OnModuleInit, OnApplicationShutdown {
  private readonly logger: Logger;
  /** Charges stay in its buffer until stored or set aside; it drains only what waited when the drain started. */
  private readonly writer: BatchWriter<PendingCharge>;
  private written = 0;
  /** Charges settled after the last flush at shutdown (lost). */
  private lostLate = 0;
  /** Pending reservations per user / department id: a refused reservation flushes only when it can help. */
  private readonly pendingHolds = new Map<string, number>();
  /** A batch the database rejected for its content is retried in halves, down to one charge. */
  private batchLimit: number;
  /**
   * Cache-hit rows still counting, by key, model, task type, door and second. A row leaves this
   * map (and counts no more) as soon as a store attempt serialises it, so a retried batch sends
   * the very row its first attempt sent, and ON CONFLICT keeps it from counting twice.
   */
  private readonly openHits = new Map<string, { charge: PendingCharge; row: LedgerEntry & { cache_hits: number } }>();

  constructor(
    private readonly database: BudgetDatabase,
    private readonly clock: Clock,
    private readonly config: AppConfig,
    appLogger: AppLogger,
    @Optional() private readonly readiness?: ReadinessRegistry,
    @Optional() private readonly shutdown?: ShutdownService,
  ) {
    this.logger = appLogger.logger.child({ context: 'BudgetWriter' });
    this.batchLimit = config.budget.flushBatch;
    this.writer = new BatchWriter<PendingCharge>({
      store: (batch) => this.store(batch),
      batchSize: config.budget.flushBatch,
      flushMs: config.budget.flushMs,
      maxBackoffMs: MAX_BACKOFF_MS,
      logger: this.logger,
      messages: {
        failed: 'budget flush failed; settles and ledger rows kept in memory and retried',
        stillFailing: 'budget flush still failing',
        recovered: 'budget writes recovered',
      },
      drained: () => {
        this.batchLimit = this.config.budget.flushBatch;
      },
      describeError: errorMessage,
    });
  }

  onModuleInit(): void {
    this.readiness?.register('budget_writer', () => Promise.resolve(this.report()));
    this.writer.start();
  }

  /**
   * Nest calls this after the HTTP server closed (the drain in src/lifecycle ran in
   * beforeApplicationShutdown, and so did the job workers'), and before the database closes
   * (DatabaseModule is global, shut down after feature modules): every settle is in the buffer.
   */
  async onApplicationShutdown(): Promise<void> {
    this.writer.stop();
    await this.drainForShutdown();
    // A pool ends once its statements are over, and one the last flush gave up on (a database
    // that does not answer) holds it until its query timeout, 35 s: every later shutdown hook, the
    // audit's last flush among them, would wait that long, past the pod's grace period. The close
    // goes on in the background; after a signal the process exits soon after (ShutdownService).
    const closing = this.database.close().catch((error: unknown) => {
      this.logger.warn({ err: errorMessage(error) }, 'closing the budget connections failed');
    });
    await Promise.race([closing, new Promise((resolve) => setTimeout(resolve, POOL_CLOSE_WAIT_MS).unref())]);
  }

  /** Buffers a settle or a cache hit. Never throws and never waits. */
  enqueue(charge: PendingCharge): void {
    if (charge.rows.length === 0 && !charge.release) return;
    if (this.writer.finished) {
      // After the last flush nothing would store it (the pool is closing): lost, and said so, as
      // the ones the last flush could not store are.
      this.lostLate += 1;
      this.writer.loud('late', () =>
        this.logger.error(
          { lost: this.lostLate, requestId: charge.rows[0]?.request_id, costUsd: formatUsd(chargedNanos([charge])) },
          'BUDGET CHARGES LOST: settled after the last flush at shutdown; its reservation stays held until the sweeper releases it',
        ),
      );
      return;
    }
    if (charge.release) this.countHold(charge.release, 1);
    this.writer.add(charge);
    if (!this.writer.started) {
      this.writer.loud('late', () => this.logger.error({ buffered: this.writer.size }, 'budget charge queued after the writer stopped; flushing it now'));
      void this.flush();
    }
  }

  /**
   * Counts a cache hit into the ledger: into the row already counting this key's hits on the same
   * model, task type and door within the same second, or into a new one. A hit is free, so the
   * reports lose nothing (requests and tokens are summed); its own record, with its request id,
   * is the audit event. One row per hit cost 7-9% of a hit's CPU at 16 connections (session 15).
   * Never throws and never waits.
   */
  recordCacheHit(hit: CacheHitEntry): void {
    const second = Math.floor(hit.at.getTime() / 1000);
    const group = `${hit.keyId ?? ''}\n${hit.userId}\n${hit.departmentId}\n${hit.model}\n${hit.taskType ?? ''}\n${hit.door}\n${second}`;
    const tokens = hit.promptTokens + hit.completionTokens;
    const open = this.openHits.get(group);
    if (open !== undefined) {
      const row = open.row;
      // Checked before adding: a hit that would take the sums past the bound goes into a new row,
      // as summing first could pass `integer`, and the flush would set the whole count aside.
      if (row.prompt_tokens + row.completion_tokens + tokens <= MAX_TOKENS_PER_ROW) {
        row.cache_hits += 1;
        row.prompt_tokens += hit.promptTokens;
        row.completion_tokens += hit.completionTokens;
        if (row.cache_hits >= MAX_HITS_PER_ROW || row.prompt_tokens + row.completion_tokens >= MAX_TOKENS_PER_ROW) this.closeHits(open.charge);
        return;
      }
      this.closeHits(open.charge);
    }
    const row = {
      charge_id: randomUUID(),
      // The first hit's: the row stands for all it counts, and the reports do not count it as one request.
      request_id: hit.requestId,
      attempt: 0,
      key_id: hit.keyId,
      user_id: hit.userId,
      department_id: hit.departmentId,
      model: hit.model,
      prompt_tokens: hit.promptTokens,
      completion_tokens: hit.completionTokens,
      cost_nanos: '0',
      cost_source: 'cache' as const,
      status: 200,
      outcome: 'ok',
      cache: 'hit',
      task_type: hit.taskType,
      door: hit.door,
      created_at: isoTime(hit.at.getTime()),
      cache_hits: 1,
    };
    const charge: PendingCharge = { release: undefined, rows: [row], hitGroup: undefined };
    // A hit at the bound on its own gets a row to itself, closed at once: each column still fits
    // (BudgetService caps a hit's counts at `integer`), and no later hit can push it past.
    if (tokens < MAX_TOKENS_PER_ROW) {
      charge.hitGroup = group;
      this.openHits.set(group, { charge, row });
    }
    this.enqueue(charge);
  }

  /** Reservations fail closed once the buffer is full: a call whose cost cannot be recorded must not start. */
  assertAccepting(): void {
    if (this.writer.size < MAX_BUFFERED) return;
    this.writer.loud('full', () =>
      this.logger.error(
        { buffered: this.writer.size, lastError: this.writer.lastError },
        'BUDGET WRITES BACKED UP: the database keeps refusing settles; new requests are refused until it takes them',
      ),
    );
    throw new GatewayError('unavailable', 'Budgets cannot be recorded right now (database unavailable), so the request was not sent upstream.');
  }

  /** Whether settles still to be stored hold money on this user's or department's budget. */
  holdsPendingFor(userId: string, departmentId: string): boolean {
    return this.pendingHolds.has(userId) || this.pendingHolds.has(departmentId);
  }

  /**
   * Stores every charge queued before this call (later ones may ride along). Resolves false if
   * the database refused; never throws. The budget views call it so that one instance answers
   * consistently right after a response.
   */
  flush(): Promise<boolean> {
    return this.writer.flush();
  }

  stats(): BudgetWriterStats {
    return { buffered: this.writer.size, written: this.written, failing: this.writer.failures > 0, lastError: this.writer.lastError };
  }

  report(): ReadinessReport {
    return this.writer.report({ buffered: this.writer.size, written: this.written });
  }

  /**
   * Stores the front of the batch with ONE statement. A batch the database rejects for its data
   * is retried in halves (resolving 0: nothing done yet) until the one bad charge is set aside.
   */
  private async store(batch: readonly PendingCharge[]): Promise<number> {
    const part = batch.length > this.batchLimit ? batch.slice(0, this.batchLimit) : batch;
    try {
      await this.write(part);
      this.written += part.length;
    } catch (error) {
      if (!isDataError(error)) throw error;
      if (part.length > 1) {
        this.batchLimit = Math.ceil(part.length / 2);
        return 0;
      }
      this.setAside(part, error);
      this.batchLimit = this.config.budget.flushBatch;
    }
    for (const charge of part) if (charge.release) this.countHold(charge.release, -1);
    return part.length;
  }

  private async write(batch: readonly PendingCharge[]): Promise<void> {
    const now = this.clock.now();
    const starts = periodStarts(now);
    const releases: string[] = [];
    const shrinks: Array<{ id: string; nanos: string }> = [];
    const rows: LedgerEntry[] = [];
    for (const charge of batch) {
      const release = charge.release;
      if (release?.nanos !== undefined) shrinks.push({ id: release.id, nanos: release.nanos.toString() });
      else if (release) releases.push(release.id);
      // Serialised below: from here on this count is what the database gets, on every retry.
      this.closeHits(charge);
      rows.push(...charge.rows);
    }
    await this.database.write(FLUSH, [
      now.toISOString(),
      starts.day.toISOString(),
      starts.week.toISOString(),
      starts.month.toISOString(),
      JSON.stringify(releases),
      JSON.stringify(rows),
      JSON.stringify(shrinks),
    ]);
  }

  /** Stops a count of cache hits from counting more (a charge that is no open count is left as it is). */
  private closeHits(charge: PendingCharge): void {
    if (charge.hitGroup === undefined) return;
    if (this.openHits.get(charge.hitGroup)?.charge === charge) this.openHits.delete(charge.hitGroup);
    charge.hitGroup = undefined;
  }

  /** One charge the database will not take as it is: kept in the log for reconciliation, not retried forever. */
  private setAside(batch: readonly PendingCharge[], error: unknown): void {
    const charge = batch[0];
    let cost = 0n;
    for (const row of charge?.rows ?? []) cost += BigInt(row.cost_nanos);
    this.logger.error(
      { err: errorMessage(error), costUsd: formatUsd(cost), charge },
      'BUDGET CHARGE REJECTED by the database and set aside: its ledger rows are not stored; its reservation stays held until the sweeper releases it',
    );
  }

  private countHold(release: PendingRelease, delta: number): void {
    for (const id of [release.userId, release.departmentId]) {
      const n = (this.pendingHolds.get(id) ?? 0) + delta;
      if (n > 0) this.pendingHolds.set(id, n);
      else this.pendingHolds.delete(id);
    }
  }

  private async drainForShutdown(): Promise<void> {
    await this.writer.drainForShutdown(this.shutdown?.writeDeadline());
    if (this.writer.size === 0) return;
    const buffer = this.writer.buffer;
    this.logger.error(
      {
        lost: buffer.length,
        costUsd: formatUsd(chargedNanos(buffer)),
        lastError: this.writer.lastError,
        requestIds: buffer.slice(0, 100).map((c) => c.rows[0]?.request_id),
      },
      'BUDGET CHARGES LOST: shutting down with settles the database would not take; their reservations stay held until the sweeper releases them',
    );
  }
}

function errorMessage(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).slice(0, 200);
}

/** What charges that could not be stored would have cost: the sum of their ledger rows. */
function chargedNanos(charges: readonly PendingCharge[]): bigint {
  let cost = 0n;
  for (const charge of charges) for (const row of charge.rows) cost += BigInt(row.cost_nanos);
  return cost;
}
