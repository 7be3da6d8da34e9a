import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { HELD_BY_SQL, SWEEP_SQL } from './budget-sql.js';

/**
 * Releases reservations an instance left behind when it died between reserve and settle.
 * A live instance renews the rows it still holds every quarter of BUDGET_RESERVATION_TTL_MS
 * (BudgetService.renewHeld), however long their calls run (a stream has no total time limit),
 * so a row not renewed for that long belongs to an instance that is gone. Every instance sweeps;
 * the DELETE … RETURNING hands each orphan to exactly one.
 */
@Injectable()
export class BudgetSweeper implements OnModuleInit, OnApplicationShutdown {
  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<number> | undefined;

  constructor(
    private readonly dataSource: DataSource,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'BudgetSweeper' });
  }

  async onModuleInit(): Promise<void> {
    if (this.config.database.driver === 'pglite') await this.releaseAllAtStart();
    this.timer = setInterval(() => {
      this.sweep().catch((error: unknown) => this.logger.warn({ err: (error as Error).message }, 'budget sweep failed; will retry'));
    }, this.config.budget.sweepIntervalMs);
    // The sweep must never keep a process (or a test run) alive on its own.
    this.timer.unref();
  }

  onApplicationShutdown(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Runs one sweep now (one statement); returns how many reservations were released. */
  sweep(): Promise<number> {
    this.running ??= this.sweepOnce().finally(() => {
      this.running = undefined;
    });
    return this.running;
  }

  /**
   * Only on the embedded database, at start: it belongs to this process alone (its data dir is
   * locked), so every hold found then was left by the process before it, which died between
   * reserve and settle (SIGKILL, OOM, power loss). Released now, not one TTL later, before a job
   * it left running runs again and is refused on its own dead try's hold.
   */
  async releaseAllAtStart(): Promise<number> {
    const released = await this.release(this.clock.now());
    if (released > 0) this.logger.warn({ released }, 'released budget reservations left by the previous process');
    return released;
  }

  /** Releases the reservations not renewed since `cutoff`; returns how many. */
  private async release(cutoff: Date): Promise<number> {
    const [row] = await this.dataSource.query<Array<{ released: string | number }>>(SWEEP_SQL, [cutoff.toISOString(), this.clock.now().toISOString()]);
    return Number(row?.released ?? 0);
  }

  /**
   * Whether any of the given requests of one user still holds an exact reservation: a job's
   * earlier try whose worker died before it settled, until it is swept (JobProcessor waits for
   * that rather than failing its next try 402 on the dead try's hold). Request ids are the
   * caller's to choose, so a caller can only make its own job wait a little longer, never free
   * anyone's hold.
   */
  async holds(requestIds: readonly string[], userId: string): Promise<boolean> {
    if (requestIds.length === 0) return false;
    const rows = await this.dataSource.query<unknown[]>(HELD_BY_SQL, [requestIds, userId]);
    return rows.length > 0;
  }

  private async sweepOnce(): Promise<number> {
    const now = this.clock.now();
    const cutoff = new Date(now.getTime() - this.config.budget.reservationTtlMs);
    const released = await this.release(cutoff);
    if (released > 0) this.logger.warn({ released, olderThan: cutoff.toISOString() }, 'released budget reservations orphaned by a crashed instance');
    return released;
  }
}
