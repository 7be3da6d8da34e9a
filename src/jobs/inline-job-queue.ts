import type { GatewayError } from '../core/errors.js';
import type { ReadinessReport } from '../health/readiness.js';
import {
  delayFor,
  settlesWithin,
  type JobHandler,
  JobQueue,
  type JobQueueOptions,
  type QueueCounts,
  queueFull,
  queueUnavailable,
  RecheckJobError,
} from './job-queue.js';

const DEFAULT_SHUTDOWN_GRACE_MS = 10_000;
// After the grace period running jobs are aborted; this bounds the wait for them to notice.
const ABORT_WAIT_MS = 2_000;

/**
 * The embedded default: jobs run in this process, with bounded concurrency and a bounded length.
 * Nothing is persisted here; the job records in the database are, and the jobs runtime requeues
 * unfinished ones at start, so a restart loses no accepted job.
 */
export class InlineJobQueue extends JobQueue {
  readonly driver = 'inline' as const;

  private readonly waiting: string[] = [];
  private readonly active = new Map<string, { controller: AbortController; done: Promise<void> }>();
  private readonly delayed = new Map<string, NodeJS.Timeout>();
  private readonly tries = new Map<string, number>();
  private handler: JobHandler | undefined;
  private closing = false;
  private stopping: Promise<void> | undefined;

  constructor(private readonly options: JobQueueOptions) {
    super();
  }

  private get size(): number {
    return this.waiting.length + this.active.size + this.delayed.size;
  }

  private refusal(): GatewayError | undefined {
    // Stopped: nothing here would run it before the process exits.
    if (this.closing) return queueUnavailable();
    if (this.size >= this.options.maxQueued) return queueFull(this.options.maxQueued);
    return undefined;
  }

  private holds(jobId: string): boolean {
    return this.active.has(jobId) || this.delayed.has(jobId) || this.waiting.includes(jobId);
  }

  assertAccepting(): void {
    const refusal = this.refusal();
    if (refusal) throw refusal;
  }

  submit(jobId: string): Promise<void> {
    if (this.holds(jobId)) return Promise.resolve();
    // Checked and added in one synchronous step: the bound is exact, whatever the concurrency.
    // A refusal is a rejected promise, as with every driver, never a synchronous throw.
    const refusal = this.refusal();
    if (refusal) return Promise.reject(refusal);
    this.waiting.push(jobId);
    this.pump();
    return Promise.resolve();
  }

  requeue(jobId: string): Promise<void> {
    if (!this.holds(jobId) && !this.closing) {
      this.waiting.push(jobId);
      this.pump();
    }
    return Promise.resolve();
  }

  ready(): Promise<void> {
    return Promise.resolve();
  }

  start(handler: JobHandler): void {
    if (this.handler) throw new Error('InlineJobQueue.start() called twice');
    this.handler = handler;
    this.pump();
  }

  counts(): Promise<QueueCounts> {
    return Promise.resolve({ waiting: this.waiting.length, active: this.active.size, delayed: this.delayed.size });
  }

  health(): Promise<ReadinessReport> {
    return Promise.resolve({
      state: 'up',
      details: {
        driver: this.driver,
        waiting: this.waiting.length,
        active: this.active.size,
        delayed: this.delayed.size,
        processing: this.handler !== undefined,
      },
    });
  }

  close(): Promise<void> {
    return this.stop();
  }

  /**
   * Once: close() follows stop() at shutdown, and a job that ignored the abort is still active
   * then; waiting out the grace period for it a second time would double the shutdown.
   */
  stop(): Promise<void> {
    this.stopping ??= this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    this.closing = true;
    // Delayed and waiting jobs stay queued in the database; the next start requeues them.
    for (const timer of this.delayed.values()) clearTimeout(timer);
    this.delayed.clear();
    this.waiting.length = 0;
    const running = () => Promise.all([...this.active.values()].map((a) => a.done));
    if (this.active.size === 0) return;
    if (await settlesWithin(running(), this.options.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS)) return;
    for (const { controller } of this.active.values()) controller.abort(new Error('the gateway is shutting down'));
    await settlesWithin(running(), ABORT_WAIT_MS);
  }

  private pump(): void {
    const handler = this.handler;
    if (!handler) return;
    while (!this.closing && this.active.size < this.options.concurrency && this.waiting.length > 0) {
      const jobId = this.waiting.shift() as string;
      this.runOne(handler, jobId);
    }
  }

  private runOne(handler: JobHandler, jobId: string): void {
    const controller = new AbortController();
    const tries = (this.tries.get(jobId) ?? 0) + 1;
    this.tries.set(jobId, tries);
    const done = (async () => {
      try {
        await handler.run(jobId, controller.signal);
        this.tries.delete(jobId);
      } catch (error) {
        this.afterFailure(handler, jobId, tries, error);
      } finally {
        this.active.delete(jobId);
        // A job can finish while its slot is being refilled; refill on the next tick instead.
        queueMicrotask(() => this.pump());
      }
    })();
    this.active.set(jobId, { controller, done });
  }

  private afterFailure(handler: JobHandler, jobId: string, tries: number, error: unknown): void {
    if (this.closing) {
      this.tries.delete(jobId);
      return;
    }
    if (error instanceof RecheckJobError) {
      // Nothing ran: only waiting for a run elsewhere, which must never bring the job nearer to abandon().
      this.tries.set(jobId, tries - 1);
    } else if (tries >= this.options.maxTries) {
      this.tries.delete(jobId);
      // abandon() records the job as dead-lettered; if even that fails, the runtime's sweep requeues it.
      void handler.abandon(jobId, error).catch(() => undefined);
      return;
    }
    const timer = setTimeout(
      () => {
        this.delayed.delete(jobId);
        this.waiting.push(jobId);
        this.pump();
      },
      delayFor(error, tries, this.options.backoff),
    );
    timer.unref();
    this.delayed.set(jobId, timer);
  }
}
