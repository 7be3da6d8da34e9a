import { type Job, Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { ReadinessReport } from '../health/readiness.js';
import { delayFor, settlesWithin, type JobHandler, JobQueue, type JobQueueOptions, type QueueCounts, queueFull, queueUnavailable } from './job-queue.js';

export interface BullmqJobQueueOptions extends JobQueueOptions {
  redisUrl: string;
  /** BullMQ key prefix; with `queueName` it namespaces every key (deployments and tests share one Redis). */
  prefix: string;
  queueName: string;
  logger: Logger;
}

const DEFAULT_SHUTDOWN_GRACE_MS = 10_000;
// A submit waits at most this long for Redis before answering 503: an HTTP caller is waiting.
const REDIS_COMMAND_TIMEOUT_MS = 2_000;
const READY_WAIT_MS = 5_000;
// After the grace period running jobs are aborted; this bounds the wait for them to notice.
const ABORT_WAIT_MS = 2_000;
const BACKOFF_TYPE = 'gatehouse';
const JOB_NAME = 'complete';
// Backlog states that count against the bound (everything not finished).
const BACKLOG_STATES = ['wait', 'prioritized', 'waiting-children', 'active', 'delayed'] as const;

/**
 * The queue in Redis through BullMQ: api instances submit, worker instances (any number) process.
 * BullMQ holds only the job id (its job id is ours, which also makes requeue idempotent); retries
 * use BullMQ's own delayed set with our backoff; finished jobs are removed at once because the
 * database keeps the outcome and the dead-letter state.
 *
 * Connections are its own (BullMQ needs `maxRetriesPerRequest: null`, other Redis users must not
 * get that): one for producing, with the offline queue off so that a submit while Redis is away
 * fails at once with 503 instead of hanging; one more for the worker, created only when
 * processing starts (BullMQ duplicates it for its blocking reads).
 */
export class BullmqJobQueue extends JobQueue {
  readonly driver = 'bullmq' as const;

  private readonly producer: Redis;
  private readonly queue: Queue;
  private workerConnection: Redis | undefined;
  private worker: Worker | undefined;
  private lastErrorLog = 0;

  constructor(private readonly options: BullmqJobQueueOptions) {
    super();
    this.producer = new Redis(options.redisUrl, {
      maxRetriesPerRequest: null,
      enableOfflineQueue: false,
      connectionName: 'gatehouse-jobs-producer',
      retryStrategy: reconnectDelay,
    });
    this.producer.on('error', (error: Error) => this.logRedisError('producer', error));
    this.queue = new Queue(options.queueName, {
      connection: this.producer,
      prefix: options.prefix,
      defaultJobOptions: {
        attempts: options.maxTries,
        backoff: { type: BACKOFF_TYPE },
        removeOnComplete: true,
        removeOnFail: true,
      },
    });
    this.queue.on('error', (error: Error) => this.logRedisError('queue', error));
  }

  assertAccepting(): void {
    // Without this check a command would wait for a connection that may never come.
    if (this.producer.status !== 'ready') throw queueUnavailable();
  }

  async submit(jobId: string): Promise<void> {
    this.assertAccepting();
    const backlog = await this.redis(() => this.queue.getJobCounts(...BACKLOG_STATES));
    // Not atomic with the add across instances: the bound may be overshot by concurrent submits,
    // never by more than their number. Good enough for backpressure, and one round trip cheaper.
    if (sum(backlog) >= this.options.maxQueued) throw queueFull(this.options.maxQueued);
    await this.redis(() => this.queue.add(JOB_NAME, {}, { jobId }));
  }

  async requeue(jobId: string): Promise<void> {
    this.assertAccepting();
    // BullMQ ignores an add whose id it still holds (waiting, active or delayed): idempotent.
    await this.redis(() => this.queue.add(JOB_NAME, {}, { jobId }));
  }

  ready(): Promise<void> {
    if (this.producer.status === 'ready') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.producer.off('ready', done);
        resolve();
      };
      const timer = setTimeout(done, READY_WAIT_MS);
      this.producer.once('ready', done);
    });
  }

  start(handler: JobHandler): void {
    if (this.worker) throw new Error('BullmqJobQueue.start() called twice');
    this.workerConnection = new Redis(this.options.redisUrl, {
      maxRetriesPerRequest: null,
      connectionName: 'gatehouse-jobs-worker',
      retryStrategy: reconnectDelay,
    });
    this.workerConnection.on('error', (error: Error) => this.logRedisError('worker', error));
    const worker = new Worker(
      this.options.queueName,
      async (job: Job, _token?: string, signal?: AbortSignal) => {
        await handler.run(jobIdOf(job), signal ?? new AbortController().signal);
      },
      {
        connection: this.workerConnection,
        prefix: this.options.prefix,
        concurrency: this.options.concurrency,
        settings: { backoffStrategy: (attemptsMade: number, _type?: string, error?: Error) => delayFor(error, attemptsMade, this.options.backoff) },
      },
    );
    worker.on('error', (error: Error) => this.logRedisError('worker', error));
    worker.on('failed', (job: Job | undefined, error: Error) => {
      // 'failed' fires after every failed try; only the last one (BullMQ's own cap) means it gave up.
      if (job && job.attemptsMade >= (job.opts.attempts ?? 1)) {
        void handler.abandon(jobIdOf(job), error).catch((cause: unknown) => {
          this.options.logger.error(
            { context: 'Jobs', jobId: job.id, err: (cause as Error).message },
            'could not dead-letter an abandoned job; the sweep will requeue it',
          );
        });
      }
    });
    this.worker = worker;
  }

  async counts(): Promise<QueueCounts> {
    const c = await this.redis(() => this.queue.getJobCounts(...BACKLOG_STATES));
    return { waiting: (c.wait ?? 0) + (c.prioritized ?? 0) + (c['waiting-children'] ?? 0), active: c.active ?? 0, delayed: c.delayed ?? 0 };
  }

  async health(): Promise<ReadinessReport> {
    try {
      this.assertAccepting();
      const counts = await this.counts();
      return { state: 'up', details: { driver: this.driver, ...counts, processing: this.worker !== undefined } };
    } catch {
      // Degraded, not down: sync traffic does not need the queue (API.md "Decisions").
      return { state: 'degraded', details: { driver: this.driver, redis: 'unreachable', async_submits: 'refused with 503 unavailable' } };
    }
  }

  async stop(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined;
    if (worker) {
      if (this.workerConnection?.status === 'ready') {
        // Lets running jobs finish; after the grace period they are aborted and BullMQ keeps
        // them (delayed) for another worker. One that ignores the abort is left behind: its lock
        // expires and another worker's stalled-job check takes the job over.
        const closing = worker.close();
        if (!(await settlesWithin(closing, this.options.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS))) {
          worker.cancelAllJobs('the worker is shutting down');
          if (!(await settlesWithin(closing, ABORT_WAIT_MS)))
            this.options.logger.warn({ context: 'Jobs' }, 'a running job ignored the shutdown; leaving it to the stalled-job check');
        }
      } else {
        // Redis is away: a graceful close would wait for it forever.
        await worker.close(true);
      }
    }
    this.workerConnection?.disconnect();
  }

  async close(): Promise<void> {
    await this.stop();
    await this.queue.close().catch(() => undefined);
    this.producer.disconnect();
  }

  private async redis<T>(command: () => Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`Redis did not answer within ${REDIS_COMMAND_TIMEOUT_MS} ms`)), REDIS_COMMAND_TIMEOUT_MS);
    });
    try {
      return await Promise.race([command(), timeout]);
    } catch (error) {
      throw queueUnavailable(error);
    } finally {
      clearTimeout(timer);
    }
  }

  private logRedisError(connection: string, error: Error): void {
    // ioredis reports every failed reconnect; one line per 10 s says the same without a flood.
    const now = Date.now();
    if (now - this.lastErrorLog < 10_000) return;
    this.lastErrorLog = now;
    this.options.logger.warn({ context: 'Jobs', connection, err: error.message }, 'job queue Redis connection problem');
  }
}

function jobIdOf(job: Job): string {
  if (job.id === undefined) throw new Error('BullMQ job without id');
  return job.id;
}

function reconnectDelay(times: number): number {
  return Math.min(times * 200, 2_000);
}

function sum(counts: Record<string, number>): number {
  return Object.values(counts).reduce((a, b) => a + b, 0);
}
