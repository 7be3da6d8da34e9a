import { type BeforeApplicationShutdown, Injectable, type OnApplicationBootstrap, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { JobCallbacks } from './job-callbacks.js';
import { JobQueue } from './job-queue.js';
import { JobProcessor } from './job.processor.js';
import { JobsRepository } from './jobs.repository.js';

const SWEEP_INTERVAL_MS = 60_000;
// Longer than any try can take (the upstream deadline is minutes at most), so the sweep only
// finds jobs whose queue entry was lost; requeue is idempotent anyway.
const SWEEP_STALE_MS = 5 * 60_000;
const SWEEP_BATCH = 10_000;

/**
 * Starts and stops processing by role: `api` only submits; `worker` and `all` process. Also the
 * promise that no accepted job is dropped: at start and then every minute, unfinished job
 * records are requeued (a no-op for jobs the queue still holds), which recovers jobs of an
 * inline queue that died with its process and jobs a broker lost or gave up on.
 */
@Injectable()
export class JobsRuntime implements OnModuleInit, OnApplicationBootstrap, BeforeApplicationShutdown, OnApplicationShutdown {
  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private sweeping: Promise<void> | undefined;
  private closed = false;

  constructor(
    private readonly queue: JobQueue,
    private readonly processor: JobProcessor,
    private readonly repo: JobsRepository,
    private readonly callbacks: JobCallbacks,
    private readonly readiness: ReadinessRegistry,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Jobs' });
  }

  get processing(): boolean {
    return this.config.role !== 'api';
  }

  onModuleInit(): void {
    this.readiness.register('queue', () => this.queue.health());
  }

  async onApplicationBootstrap(): Promise<void> {
    if (!this.processing) {
      this.logger.info({ driver: this.queue.driver, role: this.config.role }, 'job queue: submitting only (GATEHOUSE_ROLE=api)');
      return;
    }
    // Before processing starts, so that no try of this process is among them.
    if (this.queue.driver === 'inline' && this.config.database.driver === 'pglite') await this.requeueLeftovers();
    this.queue.start(this.processor);
    this.logger.info({ driver: this.queue.driver, role: this.config.role, concurrency: this.config.jobs.concurrency }, 'job queue: processing');
    // In the background: a broker still connecting must not hold up the start.
    void this.queue.ready().then(() => this.sweep(0));
    this.timer = setInterval(() => void this.sweep(SWEEP_STALE_MS), SWEEP_INTERVAL_MS);
    this.timer.unref();
  }

  /** While the database is still open (it closes in onApplicationShutdown): running jobs write their outcome. */
  async beforeApplicationShutdown(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    await this.sweeping;
    await this.queue.stop();
    await this.callbacks.drain();
  }

  async onApplicationShutdown(): Promise<void> {
    await this.queue.close();
  }

  /**
   * On the embedded database, locked to one process, the inline queue is the only runner of its
   * jobs: a job still marked running at its start was running when the previous process died. Left
   * running, it would refuse the start-up sweep's delivery until its heartbeat went stale; queued
   * again, that delivery runs it at once. Not on PostgreSQL, whatever the queue: another instance
   * may be running those jobs right now (a rolling deploy starts the new pod before the old one
   * stops; replicas without REDIS_URL), and each queued again would be run, and charged, a second
   * time. There the start-up sweep delivers them too, and start() takes over those whose
   * heartbeat is stale (a dead run's, within 30 s) and leaves live runs alone.
   */
  private async requeueLeftovers(): Promise<void> {
    try {
      const requeued = await this.repo.requeueRunning(this.clock.now());
      if (requeued > 0) this.logger.info({ requeued }, 'jobs left running by the previous process are queued again');
    } catch (error) {
      // The periodic sweep still finds them, once they have been untouched for SWEEP_STALE_MS.
      this.logger.warn({ err: (error as Error).message }, 'could not requeue the jobs left running by the previous process');
    }
  }

  /** Requeues unfinished jobs untouched for `staleMs`; failures are logged and retried next round. */
  sweep(staleMs: number): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.sweeping ??= this.sweepOnce(staleMs).finally(() => {
      this.sweeping = undefined;
    });
    return this.sweeping;
  }

  private async sweepOnce(staleMs: number): Promise<void> {
    try {
      const ids = await this.repo.unfinishedSince(new Date(this.clock.nowMs() - staleMs), SWEEP_BATCH);
      for (const id of ids) await this.queue.requeue(id);
      if (ids.length > 0) this.logger.info({ requeued: ids.length }, 'requeued unfinished jobs');
    } catch (error) {
      this.logger.warn({ err: (error as Error).message }, 'job sweep failed; will try again');
    }
  }
}
