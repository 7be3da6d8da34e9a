import { BullRegistrar, InjectQueue, OnWorkerEvent, WorkerHost } from '@nestjs/bullmq';
import { Inject, Injectable } from '@nestjs/common';
import { DelayedError, type Job, type Queue, type Worker } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { withTimeout } from '../core/deadline.js';
import { LogThrottle } from '../core/log-throttle.js';
import { AppLogger } from '../core/logger.js';
import type { ReadinessReport } from '../health/readiness.js';
import { LuaScript } from '../redis/lua-script.js';
import { RecheckJobError, settlesWithin, type JobHandler, JobQueue, type JobQueueOptions, type QueueCounts, queueFull, queueUnavailable } from './job-queue.js';

/** BullMQ queue name; the prefix (from REDIS_KEY_PREFIX) keeps deployments sharing a Redis apart. */
export const JOBS_QUEUE_NAME = 'jobs';

export interface BullmqJobQueueOptions extends JobQueueOptions {
  redisUrl: string;
  /** BullMQ key prefix; with the queue name it namespaces every key (deployments and tests share one Redis). */
  prefix: string;
}

export const BULLMQ_JOB_QUEUE_OPTIONS = Symbol('BULLMQ_JOB_QUEUE_OPTIONS');
/** The producer connection (an ioredis client) that BullModule.forRootAsync hands to the queue. */
export const JOBS_PRODUCER_REDIS = Symbol('JOBS_PRODUCER_REDIS');

const DEFAULT_SHUTDOWN_GRACE_MS = 10_000;
// A submit waits at most this long for Redis before answering 503: an HTTP caller is waiting.
const REDIS_COMMAND_TIMEOUT_MS = 2_000;
// Readiness gives Redis less: a kubelet waits 1 s for a probe by default, and a Redis that holds
// the connection open without answering must read as degraded, not as a probe that timed out (on
// every pod at once, while sync traffic does not need the queue).
const HEALTH_TIMEOUT_MS = 500;
const READY_WAIT_MS = 5_000;
// After the grace period running jobs are aborted; this bounds the wait for them to notice.
const ABORT_WAIT_MS = 2_000;
const JOB_NAME = 'complete';
// Backlog states that count against the bound (everything not finished).
const BACKLOG_STATES = ['wait', 'prioritized', 'waiting-children', 'active', 'delayed'] as const;
// Of those, BullMQ keeps these as lists; the others are sorted sets.
const LIST_STATES: ReadonlySet<string> = new Set(['wait', 'active']);
// A submit admitted but whose add Redis has not answered yet holds its place this long at most:
// far beyond the add's own timeout, and what an instance that died mid-submit costs the bound.
const ADMITTING_TTL_MS = 30_000;

// Counts what getJobCounts counts for BACKLOG_STATES plus the submits already admitted and not yet
// added (KEYS[1], job id → Redis time), and holds a place for this one (ARGV[2]) when that is under
// the bound (ARGV[1]): one script, so instances admitting at once never overshoot. KEYS[2..] are
// the backlog keys, the first ARGV[4] of them lists. Returns 1 if admitted, else 0.
const ADMIT = new LuaScript(
  `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local lists = tonumber(ARGV[4])
local n = redis.call('ZCARD', KEYS[1])
for i = 2, #KEYS do
  if i <= lists + 1 then n = n + redis.call('LLEN', KEYS[i]) else n = n + redis.call('ZCARD', KEYS[i]) end
end
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1`,
  'jobs-admit',
);

/** The jobs logger, with one throttle for every job queue connection (producer, queue, worker). */
@Injectable()
export class JobsRedisLog {
  readonly logger: Logger;
  // ioredis reports every failed reconnect; one line per 10 s says the same without a flood.
  private readonly problems = new LogThrottle();
  /** A problem was logged and the producer connection has not been ready since. */
  private troubled = false;

  constructor(appLogger: AppLogger) {
    this.logger = appLogger.logger.child({ context: 'Jobs' });
  }

  problem(connection: string, error: Error): void {
    this.troubled = true;
    if (this.problems.admit('problem') === undefined) return;
    this.logger.warn({ connection, err: error.message }, 'job queue Redis connection problem');
  }

  /** The producer (every submit goes through it) is connected again: say so once per outage. */
  ready(connection: string): void {
    if (!this.troubled) return;
    this.troubled = false;
    this.problems.reset('problem');
    this.logger.info({ connection }, 'job queue Redis connection back');
  }
}

/**
 * The producer connection, ours rather than BullMQ's: BullMQ needs `maxRetriesPerRequest: null`
 * (other Redis users must not get that), and the offline queue is off so that a submit while
 * Redis is away fails at once with 503 instead of hanging. Disconnected by BullmqJobQueue.close().
 */
export function openProducerRedis(options: BullmqJobQueueOptions, log: JobsRedisLog): Redis {
  const producer = new Redis(options.redisUrl, {
    maxRetriesPerRequest: null,
    enableOfflineQueue: false,
    connectionName: 'gatehouse-jobs-producer',
    retryStrategy: reconnectDelay,
  });
  producer.on('error', (error: Error) => log.problem('producer', error));
  producer.on('ready', () => log.ready('producer'));
  return producer;
}

export function reconnectDelay(times: number): number {
  return Math.min(times * 200, 2_000);
}

/**
 * The worker side as @nestjs/bullmq runs it: BullExplorer builds the Worker for this host (its
 * options come from the `@Processor` metadata, see BullmqJobsModule) and calls `process` for each
 * job, which hands the job id to the same handler as the inline queue (JobProcessor).
 */
@Injectable()
export class JobsWorkerHost extends WorkerHost {
  private handler: JobHandler | undefined;
  private lettingGo = false;
  /** One per run going: makes its process() stop waiting for it (see letGoOfRunning()). */
  private readonly letGoes = new Set<() => void>();
  /** Shutdown waiting for the last run to end (see idle()). */
  private readonly idleWaiters: Array<() => void> = [];

  constructor(private readonly log: JobsRedisLog) {
    super();
  }

  /** Set before the worker is registered: no job can arrive without a handler. */
  attach(handler: JobHandler): void {
    this.handler = handler;
  }

  // Three declared parameters: BullMQ passes the abort signal only to a processor whose length is 3.
  async process(job: Job, token?: string, signal?: AbortSignal): Promise<void> {
    if (!this.handler) throw new Error('BullMQ job before JobQueue.start()');
    // A job BullMQ was fetching as close() began, arriving after the let-go: not started, and left
    // in Redis as a let-go run is (below).
    if (this.lettingGo) throw new DelayedError(new LeftRunning().message);
    const run = this.handler.run(jobIdOf(job), signal ?? new AbortController().signal);
    // Per run, not one for the worker: a race against a promise that stays pending for the
    // worker's life would leave a reaction on it for every job ever processed.
    let letGo!: () => void;
    const letGone = new Promise<never>((_, reject) => (letGo = () => reject(new LeftRunning())));
    this.letGoes.add(letGo);
    // Counted until the run ends or is let go of: what follows (moveToDelayed below, BullMQ's own
    // completion) waits only for Redis, and shutdown tells the two apart (BullmqJobQueue.stop()).
    const over = () => {
      this.letGoes.delete(letGo);
      if (this.letGoes.size === 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
    };
    try {
      await Promise.race([run, letGone]).finally(over);
    } catch (error) {
      if (error instanceof LeftRunning) {
        // Nobody waits for the run any more; it goes on until the process exits.
        run.catch(() => undefined);
        // BullMQ neither completes nor fails a job whose processor throws DelayedError while the
        // worker closes: the job stays active in Redis, its lock (no longer renewed) expires, and
        // another worker's stalled-job check takes it over. No 'failed' event, so onFailed never
        // sees it and it uses up no try; Worker.close() no longer waits for it.
        throw new DelayedError(error.message);
      }
      // Delayed by hand and not failed: a failure would count towards `attempts`, and BullMQ's
      // last one makes onFailed dead-letter a job that another worker is still running.
      if (error instanceof RecheckJobError && token !== undefined) {
        await job.moveToDelayed(Date.now() + error.delayMs, token);
        throw new DelayedError();
      }
      throw error;
    }
  }

  /**
   * Shutdown gives up on the runs still going after the grace period and the abort: process()
   * returns to BullMQ at once for each of them (see above), so that Worker.close(), which waits for
   * every running processor and which Nest's BullExplorer awaits again at shutdown, can finish.
   * Only ever called once close() has begun: BullMQ then fetches no further job (one it was
   * already fetching is not started, see process()).
   */
  letGoOfRunning(): void {
    this.lettingGo = true;
    for (const letGo of this.letGoes) letGo();
  }

  /** How many runs are going: counted until each ends or is let go of (what process() does after waits only for Redis). */
  get running(): number {
    return this.letGoes.size;
  }

  /** Resolves once no run is going (at once if none is). */
  idle(): Promise<void> {
    if (this.letGoes.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  @OnWorkerEvent('failed')
  onFailed(job: Job | undefined, error: Error): void {
    // 'failed' fires after every failed try; only the last one (BullMQ's own cap) means it gave up.
    if (!job || !this.handler || job.attemptsMade < (job.opts.attempts ?? 1)) return;
    void this.handler.abandon(jobIdOf(job), error).catch((cause: unknown) => {
      this.log.logger.error({ jobId: job.id, err: (cause as Error).message }, 'could not dead-letter an abandoned job; the sweep will requeue it');
    });
  }

  @OnWorkerEvent('error')
  onError(error: Error): void {
    this.log.problem('worker', error);
  }
}

/**
 * The queue in Redis through BullMQ, wired by @nestjs/bullmq (BullmqJobsModule): api instances
 * submit, worker instances (any number) process. BullMQ holds only the job id (its job id is
 * ours, which also makes requeue idempotent); retries use BullMQ's own delayed set with our
 * backoff; finished jobs are removed at once because the database keeps the outcome and the
 * dead-letter state.
 *
 * The worker is registered by hand (`manualRegistration`) in start(): it and its connections
 * exist only in roles that process, and only from the moment processing starts.
 */
@Injectable()
export class BullmqJobQueue extends JobQueue {
  readonly driver = 'bullmq' as const;

  private processing = false;
  private registered = false;
  /** ADMIT's keys: the submits being admitted, then BACKLOG_STATES' lists and sorted sets. */
  private readonly admitKeys: string[];
  private readonly admitLists: number;

  constructor(
    @InjectQueue(JOBS_QUEUE_NAME) private readonly queue: Queue,
    @Inject(JOBS_PRODUCER_REDIS) private readonly producer: Redis,
    @Inject(BULLMQ_JOB_QUEUE_OPTIONS) private readonly options: BullmqJobQueueOptions,
    private readonly host: JobsWorkerHost,
    private readonly registrar: BullRegistrar,
    private readonly log: JobsRedisLog,
  ) {
    super();
    this.queue.on('error', (error: Error) => this.log.problem('queue', error));
    const lists = BACKLOG_STATES.filter((state) => LIST_STATES.has(state));
    const sets = BACKLOG_STATES.filter((state) => !LIST_STATES.has(state));
    // Named as BullMQ names its own keys (prefix, queue name), so deployments stay apart.
    this.admitKeys = [this.queue.toKey('admitting'), ...[...lists, ...sets].map((state) => this.queue.toKey(state))];
    this.admitLists = lists.length;
  }

  assertAccepting(): void {
    // Without this check a command would wait for a connection that may never come.
    if (this.producer.status !== 'ready') throw queueUnavailable();
  }

  async submit(jobId: string): Promise<void | 'uncertain'> {
    this.assertAccepting();
    // Unanswered, it may have run: the place it holds then lapses after ADMITTING_TTL_MS.
    const admitted = await this.redis(() => ADMIT.run(this.producer, this.admitKeys, [this.options.maxQueued, jobId, ADMITTING_TTL_MS, this.admitLists]));
    if (admitted !== 1) throw queueFull(this.options.maxQueued);
    const adding = this.queue.add(JOB_NAME, {}, { jobId });
    // Given back once Redis has answered the add, whatever it said (BullMQ's keys count the job
    // from then on), not when the wait below gives up: an add answered late may still land. Not
    // waited for; one that Redis does not get lapses after ADMITTING_TTL_MS.
    void adding
      .finally(() => this.producer.zrem(this.admitKeys[0], jobId))
      .catch(() => undefined);
    try {
      await this.redis(() => adding);
    } catch (error) {
      // Sent, unanswered: Redis may have run it and a worker may be running the job already.
      // A 503 then told the caller "not accepted" about a job that ran and was charged.
      if ((error as Error).cause instanceof RedisUnanswered) {
        this.log.logger.warn({ jobId }, 'Redis did not confirm a job’s add in time; accepted, and queued again by the sweep if it was lost');
        return 'uncertain';
      }
      throw error;
    }
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
    if (this.registered) throw new Error('BullmqJobQueue.start() called twice');
    this.registered = true;
    this.host.attach(handler);
    // Builds (and runs) the Worker of every @Processor host; ours is the only one.
    this.registrar.register();
    this.processing = true;
  }

  async counts(timeoutMs = REDIS_COMMAND_TIMEOUT_MS): Promise<QueueCounts> {
    const c = await this.redis(() => this.queue.getJobCounts(...BACKLOG_STATES), timeoutMs);
    return { waiting: (c.wait ?? 0) + (c.prioritized ?? 0) + (c['waiting-children'] ?? 0), active: c.active ?? 0, delayed: c.delayed ?? 0 };
  }

  async health(): Promise<ReadinessReport> {
    try {
      this.assertAccepting();
      const counts = await this.counts(HEALTH_TIMEOUT_MS);
      return { state: 'up', details: { driver: this.driver, ...counts, processing: this.processing } };
    } catch (error) {
      // Degraded, not down: sync traffic does not need the queue (API.md "Decisions"). Connected
      // but failing (a frozen server, a dropped network, an error reply) says why.
      const cause = (error as { cause?: unknown }).cause;
      const redis = this.producer.status === 'ready' && cause instanceof Error ? cause.message.slice(0, 200) : 'unreachable';
      return { state: 'degraded', details: { driver: this.driver, redis, async_submits: 'refused with 503 unavailable' } };
    }
  }

  async stop(): Promise<void> {
    if (!this.processing) return;
    this.processing = false;
    const worker = this.host.worker;
    // The worker's connections are BullMQ's own; the producer, on the same Redis, says whether it is there.
    if (this.producer.status !== 'ready') {
      // Redis is away: a graceful close would wait for it forever. A forced one sends nothing
      // and waits for no job; bounded all the same, and dropped if it does wait.
      if (!(await settlesWithin(worker.close(true), ABORT_WAIT_MS))) await this.dropWorkerConnections(worker, 'Redis is away');
      return;
    }
    // Lets running jobs finish; after the grace period they are aborted and BullMQ keeps them
    // (delayed) for another worker. One that ignores the abort is let go of: BullMQ leaves its
    // job active in Redis under a lock nobody renews, and once that expires another worker's
    // stalled-job check takes the job over. The producer says 'ready' also while Redis holds its
    // connections without answering (ioredis has no command timeout): once no job is running the
    // close waits only for Redis, and is given ABORT_WAIT_MS, not what is left of the grace period.
    const closing = worker.close();
    let outcome = await this.closeWithin(closing, this.options.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS);
    if (outcome === 'jobs running') {
      worker.cancelAllJobs('the worker is shutting down');
      outcome = await this.closeWithin(closing, ABORT_WAIT_MS);
      if (outcome === 'jobs running') {
        this.log.logger.warn({ running: this.host.running }, 'a running job ignored the shutdown; leaving it to the stalled-job check');
        // Else close() (and Nest's own Worker.close() at shutdown, which returns the same
        // promise: a later close(true) does not force it) waits for that job forever.
        this.host.letGoOfRunning();
        outcome = (await settlesWithin(closing, ABORT_WAIT_MS)) ? 'closed' : 'redis not answering';
      }
    }
    if (outcome === 'redis not answering') await this.dropWorkerConnections(worker, 'Redis did not answer the worker’s close');
  }

  /**
   * Waits for the worker's close until `ms` have passed ('jobs running' then), or until no job has
   * been running for ABORT_WAIT_MS without the close settling: it then waits only for Redis (the
   * last completions, QUIT, the blocking connection), which does not answer.
   */
  private async closeWithin(closing: Promise<void>, ms: number): Promise<'closed' | 'jobs running' | 'redis not answering'> {
    let closed = false;
    const settled = closing.then(
      () => (closed = true),
      () => (closed = true),
    );
    const until = performance.now() + ms;
    for (;;) {
      const left = until - performance.now();
      if (left <= 0 || !(await settlesWithin(Promise.race([settled, this.host.idle()]), left))) return 'jobs running';
      if (closed) return 'closed';
      // No job is running. One BullMQ was fetching as close() began may still start: the loop
      // then waits for it, within what is left of `ms`.
      if (await settlesWithin(settled, ABORT_WAIT_MS)) return 'closed';
      if (this.host.running === 0) return 'redis not answering';
    }
  }

  /**
   * Disconnects the worker's connections: commands waiting for Redis fail, which ends the close
   * (and Nest's BullExplorer, which awaits the same close at shutdown) without Redis. A job still
   * in Redis as active is taken over by another worker's stalled-job check once its lock expires.
   */
  private async dropWorkerConnections(worker: Worker, why: string): Promise<void> {
    this.log.logger.warn({ running: this.host.running }, `${why}: disconnecting the worker from it; jobs it held go to the stalled-job check`);
    await settlesWithin(worker.disconnect(), ABORT_WAIT_MS);
    await endStranded(worker);
  }

  async close(): Promise<void> {
    await this.stop();
    // On the producer, which BullMQ treats as shared: its close sends nothing to Redis. Bounded all
    // the same (so is the producer: disconnect() fails what is still waiting for Redis).
    await settlesWithin(this.queue.close(), ABORT_WAIT_MS);
    this.producer.disconnect();
  }

  private async redis<T>(command: () => Promise<T>, timeoutMs = REDIS_COMMAND_TIMEOUT_MS): Promise<T> {
    try {
      return await withTimeout(command(), timeoutMs, () => new RedisUnanswered(timeoutMs));
    } catch (error) {
      throw queueUnavailable(error);
    }
  }
}

/**
 * ioredis never ends a client that was disconnected while it waited to reconnect: its socket is
 * already gone and disconnect() clears the timer, so no 'close' comes, its status stays
 * 'reconnecting' and what it queued (BullMQ's BZPOPMIN) waits for ever (redis/ioredis#1247, fixed
 * by the open #2169). BullMQ's close waits for the blocking connection's 'end' and for its fetch
 * loop, so a shutdown soon after a Redis failover or restart (the blocking connection between two
 * reconnects) never finished, Nest's own close of the worker with it. Once we have disconnected
 * them, a connection still 'reconnecting' is such a one: it is ended as ioredis ends a manually
 * closed one (status 'end', which emits 'end', and its queues failed). Those two methods are
 * ioredis's own, private to TypeScript only; without them, the 'end' alone is emitted.
 */
async function endStranded(worker: Worker): Promise<void> {
  const backend = worker.backend as { connection?: { client: Promise<unknown> }; blockingConnection?: { client: Promise<unknown> } };
  for (const connection of [backend.blockingConnection, backend.connection]) {
    if (!connection) continue;
    const client = await Promise.race([connection.client, Promise.resolve(undefined)]);
    if (!(client instanceof Redis) || client.status !== 'reconnecting') continue;
    const stranded = client as unknown as { setStatus?: (status: string) => void; flushQueue?: (error: Error) => void };
    if (typeof stranded.setStatus === 'function' && typeof stranded.flushQueue === 'function') {
      stranded.setStatus('end');
      stranded.flushQueue(new Error('Connection is closed.'));
    } else {
      client.emit('end');
    }
  }
}

/** Shutdown stopped waiting for a run that ignored its abort. */
class LeftRunning extends Error {
  constructor() {
    super('left running at shutdown; the stalled-job check hands it to another worker');
  }
}

/** A command sent that Redis did not answer in time: it may have run it. */
class RedisUnanswered extends Error {
  constructor(timeoutMs: number) {
    super(`Redis did not answer within ${timeoutMs} ms`);
  }
}

function jobIdOf(job: Job): string {
  if (job.id === undefined) throw new Error('BullMQ job without id');
  return job.id;
}
