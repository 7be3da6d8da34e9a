import { type BeforeApplicationShutdown, Injectable, type OnApplicationBootstrap } from '@nestjs/common';
import type { Logger } from 'pino';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { JobsRepository } from './jobs.repository.js';

const SWEEP_EVERY_MS = 10 * 60_000;
// Small batches, each its own short statement: a sweep never holds many row locks at once, nor
// for long, next to the submits and tries writing the same table.
const SWEEP_BATCH = 1000;
// 10,000 jobs per round, 1.4 million a day: a backlog (the first sweep after an upgrade) is
// worked off over a few rounds instead of in one long burst.
const SWEEP_MAX_BATCHES = 10;
const HOUR_MS = 3_600_000;
const SHUTDOWN_WAIT_MS = 1000;

/**
 * Deletes finished jobs (completed or failed, with their request bodies and results)
 * JOBS_RETENTION_HOURS after they finished; 0 keeps them for ever. Jobs in the dead-letter queue
 * stay until an admin retries or discards them. Runs where jobs are processed (roles worker and
 * all), at start and every 10 minutes. Instances that sweep at once share the rows (the delete
 * skips rows another has locked), so no instance needs to be the only sweeper.
 */
@Injectable()
export class JobsRetention implements OnApplicationBootstrap, BeforeApplicationShutdown {
  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private sweeping: Promise<number> | undefined;
  private closed = false;

  constructor(
    private readonly repo: JobsRepository,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Jobs' });
  }

  onApplicationBootstrap(): void {
    if (this.config.jobs.retentionHours === 0 || this.config.role === 'api') return;
    void this.sweep();
    this.timer = setInterval(() => void this.sweep(), SWEEP_EVERY_MS);
    // The sweep must never keep a process (or a test run) alive on its own.
    this.timer.unref();
  }

  /**
   * While the database is still open (it closes in onApplicationShutdown). The batch running now
   * is waited for, briefly: on a database that does not answer it would hold every later shutdown
   * hook for its query timeout, and a delete cut short is simply done by the next sweep.
   */
  async beforeApplicationShutdown(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    if (this.sweeping) await Promise.race([this.sweeping, new Promise((resolve) => setTimeout(resolve, SHUTDOWN_WAIT_MS).unref())]);
  }

  /** One round now; returns how many jobs it deleted. Failures are logged and retried next round. */
  sweep(): Promise<number> {
    if (this.closed || this.config.jobs.retentionHours === 0) return Promise.resolve(0);
    this.sweeping ??= this.sweepOnce().finally(() => {
      this.sweeping = undefined;
    });
    return this.sweeping;
  }

  private async sweepOnce(): Promise<number> {
    const before = new Date(this.clock.nowMs() - this.config.jobs.retentionHours * HOUR_MS);
    let deleted = 0;
    try {
      for (let batch = 0; batch < SWEEP_MAX_BATCHES && !this.closed; batch += 1) {
        const n = await this.repo.deleteFinished(before, SWEEP_BATCH);
        deleted += n;
        if (n < SWEEP_BATCH) break;
      }
    } catch (error) {
      this.logger.warn({ err: (error as Error).message, deleted }, 'deleting finished jobs past JOBS_RETENTION_HOURS failed; will try again');
      return deleted;
    }
    if (deleted > 0) this.logger.info({ deleted, finishedBefore: before.toISOString() }, 'deleted finished jobs past JOBS_RETENTION_HOURS');
    return deleted;
  }
}
