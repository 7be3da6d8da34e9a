import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { RELEASE_REQUESTS_SQL, SWEEP_SQL } from './budget-sql.js';

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

  onModuleInit(): void {
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
   * Releases now the exact reservations the given requests of one user still hold, known to be
   * over though their holder never said so (a job's tries before the one that took it over from
   * a dead worker); returns how many. Without this they held the budget until the sweep, and the
   * takeover's own reserve was refused (402) on a budget that could cover it.
   */
  async releaseRequests(requestIds: readonly string[], userId: string): Promise<number> {
    if (requestIds.length === 0) return 0;
    const [row] = await this.dataSource.query<Array<{ released: string | number }>>(RELEASE_REQUESTS_SQL, [
      requestIds,
      this.clock.now().toISOString(),
      userId,
    ]);
    return Number(row?.released ?? 0);
  }

  private async sweepOnce(): Promise<number> {
    const now = this.clock.now();
    const cutoff = new Date(now.getTime() - this.config.budget.reservationTtlMs);
    const [row] = await this.dataSource.query<Array<{ released: string | number }>>(SWEEP_SQL, [cutoff.toISOString(), now.toISOString()]);
    const released = Number(row?.released ?? 0);
    if (released > 0) this.logger.warn({ released, olderThan: cutoff.toISOString() }, 'released budget reservations orphaned by a crashed instance');
    return released;
  }
}
