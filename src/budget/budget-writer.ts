import { Injectable, type OnApplicationShutdown, type OnModuleInit, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import { formatUsd } from '../../libs/money/src/index.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry, type ReadinessReport } from '../health/readiness.js';
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
}

/** A reservation the flush deletes, giving back what it held. */
export interface PendingRelease {
  id: string;
  userId: string;
  departmentId: string;
}

/** A settle (its reservation, if it holds one, and one row per attempt) or a cache hit (one row). */
export interface PendingCharge {
  release: PendingRelease | undefined;
  rows: readonly LedgerEntry[];
}

export interface BudgetWriterStats {
  buffered: number;
  written: number;
  failing: boolean;
  lastError: string | undefined;
}

/** Beyond this many charges waiting (the database refusing writes for a long time) reservations are refused. */
export const MAX_BUFFERED = 100_000;
const SHUTDOWN_ATTEMPTS = 3;
const MAX_BACKOFF_MS = 5000;
const LOUD_LOG_INTERVAL_MS = 10_000;
const FLUSH: BudgetStatement = { name: 'gatehouse_budget_flush', text: FLUSH_SQL };

/**
 * Stores settles and cache-hit ledger rows off the request path: `enqueue()` only pushes onto an
 * in-memory buffer; a writer stores it with ONE statement per batch (FLUSH_SQL) every
 * `BUDGET_FLUSH_MS`, or as soon as `BUDGET_FLUSH_BATCH` charges wait, and drains it on shutdown.
 * Modelled on AuditService.
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
  private buffer: PendingCharge[] = [];
  private running: Promise<void> | undefined;
  private scheduled = false;
  private timer: NodeJS.Timeout | undefined;
  private failures = 0;
  private nextAttemptAt = 0;
  private lastError: string | undefined;
  private readonly lastLoudLogAt = new Map<string, number>();
  /** Charges ever accepted, and ever done with (stored or set aside): a flush waits for a count. */
  private accepted = 0;
  private done = 0;
  private written = 0;
  /** Pending reservations per user / department id: a refused reservation flushes only when it can help. */
  private readonly pendingHolds = new Map<string, number>();
  /** A batch the database rejected for its content is retried in halves, down to one charge. */
  private batchLimit: number;

  constructor(
    private readonly database: BudgetDatabase,
    private readonly clock: Clock,
    private readonly config: AppConfig,
    appLogger: AppLogger,
    @Optional() private readonly readiness?: ReadinessRegistry,
  ) {
    this.logger = appLogger.logger.child({ context: 'BudgetWriter' });
    this.batchLimit = config.budget.flushBatch;
  }

  onModuleInit(): void {
    this.readiness?.register('budget_writer', () => Promise.resolve(this.report()));
    this.timer = setInterval(() => this.tick(), this.config.budget.flushMs);
    // The timer alone must never keep a process alive; shutdown drains explicitly.
    this.timer.unref();
  }

  /**
   * Nest calls this after the HTTP server closed (the drain in src/lifecycle ran in
   * beforeApplicationShutdown, and so did the job workers'), and before the database closes
   * (DatabaseModule is global, shut down after feature modules): every settle is in the buffer.
   */
  async onApplicationShutdown(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.drainForShutdown();
    await this.database.close();
  }

  /** Buffers a settle or a cache hit. Never throws and never waits. */
  enqueue(charge: PendingCharge): void {
    if (charge.rows.length === 0 && !charge.release) return;
    this.buffer.push(charge);
    this.accepted += 1;
    if (charge.release) this.countHold(charge.release, 1);
    if (!this.timer) {
      this.loud('late', () => this.logger.error({ buffered: this.buffer.length }, 'budget charge queued after the writer stopped; flushing it now'));
      void this.flush();
      return;
    }
    if (this.buffer.length >= this.config.budget.flushBatch && !this.running && !this.scheduled && Date.now() >= this.nextAttemptAt) {
      // Deferred: even the synchronous start of a query does not belong on the request path.
      this.scheduled = true;
      setImmediate(() => {
        this.scheduled = false;
        void this.runDrain();
      });
    }
  }

  /** Reservations fail closed once the buffer is full: a call whose cost cannot be recorded must not start. */
  assertAccepting(): void {
    if (this.buffer.length < MAX_BUFFERED) return;
    this.loud('full', () =>
      this.logger.error(
        { buffered: this.buffer.length, lastError: this.lastError },
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
  async flush(): Promise<boolean> {
    const target = this.accepted;
    let tried = false;
    while (this.done < target) {
      if (this.running) {
        await this.running;
        continue;
      }
      if (tried) return false;
      tried = true;
      this.nextAttemptAt = 0;
      await this.runDrain();
    }
    return true;
  }

  stats(): BudgetWriterStats {
    return { buffered: this.buffer.length, written: this.written, failing: this.failures > 0, lastError: this.lastError };
  }

  report(): ReadinessReport {
    const details: Record<string, unknown> = { buffered: this.buffer.length, written: this.written };
    if (this.failures === 0) return { state: 'up', details };
    return { state: 'degraded', details: { ...details, failing: true, consecutive_failures: this.failures, last_error: this.lastError } };
  }

  private tick(): void {
    if (this.running || this.buffer.length === 0 || Date.now() < this.nextAttemptAt) return;
    void this.runDrain();
  }

  private runDrain(): Promise<void> {
    this.running ??= this.drain().finally(() => {
      this.running = undefined;
    });
    return this.running;
  }

  /**
   * Stores the charges that were waiting when it started, batch after batch, until they are
   * stored or the database fails. Later arrivals are the next tick's: a flush() waiting on this
   * must not wait on traffic that keeps coming.
   */
  private async drain(): Promise<void> {
    let remaining = this.buffer.length;
    while (remaining > 0) {
      const batch = this.buffer.slice(0, Math.min(this.batchLimit, remaining));
      try {
        await this.store(batch);
      } catch (error) {
        if (!isDataError(error)) {
          this.failed(error);
          return;
        }
        if (batch.length > 1) {
          this.batchLimit = Math.ceil(batch.length / 2);
          continue;
        }
        this.setAside(batch, error);
        this.batchLimit = this.config.budget.flushBatch;
      }
      // Charges stay in the buffer until stored: new ones were only appended behind them.
      this.buffer.splice(0, batch.length);
      remaining -= batch.length;
      this.done += batch.length;
      for (const charge of batch) if (charge.release) this.countHold(charge.release, -1);
    }
    this.batchLimit = this.config.budget.flushBatch;
    if (this.buffer.length >= this.config.budget.flushBatch && this.timer) setImmediate(() => this.tick());
  }

  private async store(batch: readonly PendingCharge[]): Promise<void> {
    const now = this.clock.now();
    const starts = periodStarts(now);
    const releases: string[] = [];
    const rows: LedgerEntry[] = [];
    for (const charge of batch) {
      if (charge.release) releases.push(charge.release.id);
      rows.push(...charge.rows);
    }
    await this.database.write(FLUSH, [
      now.toISOString(),
      starts.day.toISOString(),
      starts.week.toISOString(),
      starts.month.toISOString(),
      JSON.stringify(releases),
      JSON.stringify(rows),
    ]);
    this.written += batch.length;
    if (this.failures > 0) this.logger.warn({ failures: this.failures, buffered: this.buffer.length }, 'budget writes recovered');
    this.failures = 0;
    this.lastError = undefined;
    this.nextAttemptAt = 0;
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

  private failed(error: unknown): void {
    this.failures += 1;
    this.lastError = errorMessage(error);
    const backoff = Math.min(MAX_BACKOFF_MS, this.config.budget.flushMs * 2 ** Math.min(this.failures, 20));
    // Jitter: instances that lost the database together should not all come back at once.
    this.nextAttemptAt = Date.now() + backoff / 2 + Math.random() * (backoff / 2);
    const entry = { err: this.lastError, failures: this.failures, buffered: this.buffer.length, retryInMs: Math.round(this.nextAttemptAt - Date.now()) };
    if (this.failures === 1) this.logger.error(entry, 'budget flush failed; settles and ledger rows kept in memory and retried');
    else this.loud('failing', () => this.logger.error(entry, 'budget flush still failing'));
  }

  private async drainForShutdown(): Promise<void> {
    for (let attempt = 1; attempt <= SHUTDOWN_ATTEMPTS; attempt += 1) {
      if (await this.flush()) return;
      if (attempt < SHUTDOWN_ATTEMPTS) await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
    let cost = 0n;
    for (const charge of this.buffer) for (const row of charge.rows) cost += BigInt(row.cost_nanos);
    this.logger.error(
      {
        lost: this.buffer.length,
        costUsd: formatUsd(cost),
        lastError: this.lastError,
        requestIds: this.buffer.slice(0, 100).map((c) => c.rows[0]?.request_id),
      },
      'BUDGET CHARGES LOST: shutting down with settles the database would not take; their reservations stay held until the sweeper releases them',
    );
  }

  /** Loud but bounded: one line per kind per interval, not one per request. */
  private loud(kind: string, log: () => void): void {
    const now = Date.now();
    if (now - (this.lastLoudLogAt.get(kind) ?? 0) < LOUD_LOG_INTERVAL_MS) return;
    this.lastLoudLogAt.set(kind, now);
    log();
  }
}

/** PostgreSQL refused the content (data exception, constraint violation), not the connection. */
function isDataError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('22') || code.startsWith('23'));
}

function errorMessage(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).slice(0, 200);
}
