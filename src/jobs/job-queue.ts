import type { JobsDriver } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import type { ReadinessReport } from '../health/readiness.js';

/**
 * The queue port. It carries only job ids: the job itself (body, principal ids, state, result)
 * lives in PostgreSQL, which is the source of truth, so a queue that loses its memory (the
 * inline queue on restart, a flushed Redis) loses nothing that cannot be requeued from there.
 *
 * Delivery is at least once; the handler makes repeats harmless (a finished job is skipped).
 */
export abstract class JobQueue {
  abstract readonly driver: JobsDriver;

  /** Fails fast, without I/O, when a submit surely cannot be accepted (full, or Redis away). */
  abstract assertAccepting(): void;

  /**
   * Adds a new job; 503 `queue_full` over the bound, 503 `unavailable` when the broker is away.
   * Resolves `'uncertain'` when the add was sent but its answer never came (a broker that stalled
   * past the command timeout): it may hold the job, so the record must stay (the sweep requeues
   * it, a no-op if the broker has it) and the submit is accepted.
   */
  abstract submit(jobId: string): Promise<void | 'uncertain'>;

  /**
   * Puts an already accepted job back (recovery after a restart, an admin retry). Never refused
   * for length: an accepted job must not be dropped. A no-op when the queue still holds the id.
   */
  abstract requeue(jobId: string): Promise<void>;

  /** Resolves once the queue can take work (at most a few seconds; never rejects). */
  abstract ready(): Promise<void>;

  /** Starts processing with this handler (worker and all roles; never in the api role). */
  abstract start(handler: JobHandler): void;

  abstract counts(): Promise<QueueCounts>;

  /** The `queue` readiness check. */
  abstract health(): Promise<ReadinessReport>;

  /** Stops processing: running jobs may finish (aborted after a grace period); submits may go on. */
  abstract stop(): Promise<void>;

  /** stop(), then disconnects: nothing is accepted any more. */
  abstract close(): Promise<void>;
}

export interface JobHandler {
  /**
   * One try of a job. Returning means the job reached a final state (or needs nothing); throwing
   * asks the queue to try again later: after `RetryJobError.delayMs`, or the queue's own backoff
   * for any other error (a failure of the bookkeeping itself, e.g. the database away). A
   * `RecheckJobError` is not counted against the queue's tries.
   */
  run(jobId: string, signal: AbortSignal): Promise<void>;
  /** The queue gave up after its own cap on tries: the job must end dead-lettered, not vanish. */
  abandon(jobId: string, error: unknown): Promise<void>;
}

export interface QueueCounts {
  /** Waiting for a free worker slot. */
  waiting: number;
  active: number;
  /** Waiting out a retry backoff. */
  delayed: number;
}

export interface JobQueueOptions {
  concurrency: number;
  /** Bound on waiting + active + delayed for `submit`. */
  maxQueued: number;
  /** The queue's own cap on tries; the handler normally ends a job well before it. */
  maxTries: number;
  /** Wait before try `tries + 1` after an error that did not say how long to wait. */
  backoff: (tries: number) => number;
  /** How long close() lets running jobs finish before aborting them. */
  shutdownGraceMs?: number;
}

/** Thrown by a handler: the job failed transiently and wants another try after `delayMs`. */
export class RetryJobError extends Error {
  constructor(
    readonly delayMs: number,
    message: string,
  ) {
    super(message);
    this.name = 'RetryJobError';
  }
}

/**
 * Thrown by a handler: another worker holds the job right now (its run is alive), so this
 * delivery did nothing, and the queue should ask again after `delayMs`. Not a try: it does not
 * use up the queue's own tries, or a long run elsewhere would end with the queue giving up on
 * (and dead-lettering) a job that is still running and will store its charged result.
 */
export class RecheckJobError extends RetryJobError {
  constructor(delayMs: number, message: string) {
    super(delayMs, message);
    this.name = 'RecheckJobError';
  }
}

/** Exponential backoff with equal jitter: retries of many jobs do not hit a recovering upstream at once. */
export function exponentialBackoff(baseMs: number, maxMs: number, random: () => number = Math.random): (tries: number) => number {
  return (tries: number) => {
    const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, tries - 1));
    return Math.round(ceiling / 2 + (random() * ceiling) / 2);
  };
}

export function delayFor(error: unknown, tries: number, backoff: (tries: number) => number): number {
  return error instanceof RetryJobError ? Math.max(0, error.delayMs) : backoff(tries);
}

// Clients that back off this long rarely find the queue still full: a job takes seconds.
const QUEUE_FULL_RETRY_AFTER_SECONDS = 5;

export function queueFull(bound: number): GatewayError {
  return new GatewayError('queue_full', `The job queue is full (${bound} jobs queued or running). Try again later.`, {
    headers: { 'retry-after': String(QUEUE_FULL_RETRY_AFTER_SECONDS) },
  });
}

export function queueUnavailable(cause?: unknown): GatewayError {
  return new GatewayError(
    'unavailable',
    'The job queue is unavailable right now, so asynchronous requests cannot be accepted; synchronous requests still work.',
    {
      headers: { 'retry-after': String(QUEUE_FULL_RETRY_AFTER_SECONDS) },
      cause,
    },
  );
}

/** Whether `promise` settles within `ms` (it keeps running either way). */
export async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([
      promise.then(
        () => true,
        () => true,
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}
