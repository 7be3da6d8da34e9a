import { Injectable } from '@nestjs/common';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { databaseStep } from '../core/deadline.js';
import { GatewayError } from '../core/errors.js';
import { IDEMPOTENCY_WINDOW_MS } from '../idempotency/idempotency.service.js';
import type { Principal } from '../identity/principal.js';
import { CallbackPolicy } from './callback-policy.js';
import { JobQueue, type QueueCounts, queueUnavailable } from './job-queue.js';
import type { JobRecord, NewJob } from './job.types.js';
import { JobsRepository, type StatusCounts } from './jobs.repository.js';
import { SubmitCheck } from './submit-check.js';

export interface QueueStats {
  object: 'gateway.queue';
  driver: JobQueue['driver'];
  /** Whether this instance runs jobs (roles worker and all) or only accepts them (api). */
  processing: boolean;
  max_queued: number;
  max_attempts: number;
  /** Job records by state, from the database (all instances); `failed` includes `dead_lettered`. */
  counts: StatusCounts;
  /** What the queue itself holds right now; null when it cannot be reached. */
  broker: QueueCounts | null;
}

// A submit confirms its job within seconds (each of the queue's Redis commands times out after
// 2 s); a record left unconfirmed much longer than that has lost its submitter.
const SUBMIT_CONFIRM_MS = 60_000;

/** Accepts async requests and answers for them: the only way into the queue for doors and admins. */
@Injectable()
export class JobsService {
  constructor(
    private readonly repo: JobsRepository,
    private readonly queue: JobQueue,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    private readonly callbackPolicy: CallbackPolicy,
    private readonly submitCheck: SubmitCheck,
  ) {}

  /**
   * A new job (`created: true`), or the one this user already submitted with the same
   * idempotency key and body. The record is written before the job is queued, so a worker never
   * sees an id without its record; a submit the queue refuses removes its record again, so a
   * repeat is given the job only once the queue has confirmed it (409 until then). A key that a
   * sync call holds is 422 (refuseSyncKey).
   */
  async submit(input: NewJob): Promise<{ job: JobRecord; created: boolean }> {
    if (input.callbackUrl !== undefined && !this.config.jobs.callbackSecret) {
      throw new GatewayError('invalid_value', "'callback_url' is not available: this gateway has no JOBS_CALLBACK_SECRET to sign callbacks with.", {
        param: 'callback_url',
      });
    }
    if (input.callbackUrl !== undefined) this.assertCallbackAllowed(input.callbackUrl);
    // Refuse before writing anything when the queue surely cannot take it (full, or Redis away)
    // or the run would be refused (routing, budget: SubmitCheck). A repeat of an idempotent
    // submit is answered from its record even then, so a keyed submit is checked once its record
    // proves it new (below).
    if (input.idempotencyKey === undefined) {
      this.queue.assertAccepting();
      await this.submitCheck.assertRunnable(input);
    }
    const inserting = this.repo.insert(input, this.clock.now());
    const { job, created } = await this.bounded(inserting, () => {
      // Answered 503, but the insert may still land: its record is removed again, or the sweep
      // would find it unconfirmed and run a job its submitter was told was not accepted.
      inserting.then((late) => (late.created ? this.repo.remove(late.job.id) : undefined)).catch(() => undefined);
    });
    if (!created) {
      if (job.bodyHash !== input.bodyHash) {
        throw new GatewayError('idempotency_key_reused', 'This idempotency-key was already used with a different request; use a new key for a new request.', {
          param: 'idempotency-key',
        });
      }
      if (job.enqueuedAt === null) await this.takeOverUnconfirmed(job);
      return { job, created };
    }
    let queued: void | 'uncertain';
    try {
      if (input.idempotencyKey !== undefined) {
        await this.refuseSyncKey(input.principal.userId, input.idempotencyKey);
        await this.submitCheck.assertRunnable(input);
      }
      queued = await this.queue.submit(job.id);
    } catch (error) {
      // Waited for as any statement of the request is; one that does not answer in time still
      // runs, and a repeat of a keyed submit is 409 until it has.
      await this.bounded(this.repo.remove(job.id)).catch(() => undefined);
      throw error;
    }
    if (queued === 'uncertain') {
      // The broker may hold it, or not: accepted either way, and left unconfirmed, so the sweep
      // queues it if the broker does not have it (a no-op if it does).
      return { job, created };
    }
    // Queued whatever this write does: if it fails, the job's first try records it, and a repeat
    // finding it unconfirmed takes it over after SUBMIT_CONFIRM_MS; a database that does not answer
    // does not hold the 202 either.
    await this.bounded(this.repo.markEnqueued(job.id, this.clock.now())).catch(() => undefined);
    return { job, created };
  }

  /**
   * Sync calls and async submits share one key space per user: a key a sync call holds is
   * refused (422) whatever the body, and the job just inserted is removed again (by submit).
   * Checked after the insert, never before: IdempotencyService.open does the mirror image (claims,
   * then looks at the jobs), so of a sync call and a submit racing for one key the later reader
   * always sees the other's committed write, and at most one of them wins (in the closest race
   * both are refused and the key stays free). One more statement, only for keyed submits.
   */
  private async refuseSyncKey(userId: string, key: string): Promise<void> {
    const expiredBefore = new Date(this.clock.nowMs() - IDEMPOTENCY_WINDOW_MS);
    if (!(await this.bounded(this.repo.heldBySyncCall(userId, key, expiredBefore)))) return;
    throw new GatewayError(
      'idempotency_key_reused',
      'This idempotency-key belongs to a sync call (sent without prefer: respond-async); an async job cannot reuse it. Use a new key for a new request.',
      { param: 'idempotency-key' },
    );
  }

  /**
   * A repeat found the job not yet confirmed by the queue. Its submitter may still be waiting for
   * the queue, which may refuse it and remove the record: 409, ask again shortly. Unconfirmed for
   * longer than any submit takes, its submitter is gone (it died between insert and enqueue, or
   * could not record the enqueue), and this repeat queues it instead of leaving it to the sweep.
   */
  private async takeOverUnconfirmed(job: JobRecord): Promise<void> {
    if (this.clock.nowMs() - job.createdAt.getTime() < SUBMIT_CONFIRM_MS) {
      throw new GatewayError('request_in_progress', 'A request with this idempotency-key is still being queued; retry shortly to get its job.', {
        param: 'idempotency-key',
        headers: { 'retry-after': '1' },
      });
    }
    // A no-op for a queue that holds the job already; refused like any submit when full or away.
    await this.queue.submit(job.id);
    // Gone meanwhile: its submitter was alive after all, and the queue refused it.
    if (!(await this.bounded(this.repo.markEnqueued(job.id, this.clock.now())))) throw queueUnavailable();
  }

  /**
   * How long a caller's request (a submit, a poll) waits for one statement: then 503, instead of
   * for as long as a database that stopped answering is stuck (the pool's own query timeout is 35 s).
   */
  private bounded<T>(work: Promise<T>, onTimeout?: () => void): Promise<T> {
    return databaseStep(work, this.config.databaseRequestTimeoutMs, jobsUnavailable, onTimeout);
  }

  /** SSRF guard at the door: the host only (the path may carry the receiver's token). Where it resolves is checked at delivery. */
  private assertCallbackAllowed(callbackUrl: string): void {
    const refusal = this.callbackPolicy.refusal(new URL(callbackUrl).hostname);
    if (refusal !== undefined) throw new GatewayError('invalid_value', `'callback_url' is not allowed: ${refusal}.`, { param: 'callback_url' });
  }

  /** Only its submitter or an admin may read a job; anyone else learns nothing, not even that it exists. */
  async get(id: string, reader: Principal): Promise<JobRecord> {
    const job = await this.bounded(this.repo.find(id));
    if (!job || (reader.role !== 'admin' && job.userId !== reader.userId)) throw notFound(id);
    return job;
  }

  async stats(): Promise<QueueStats> {
    const [counts, broker] = await Promise.all([this.repo.counts(), this.queue.counts().catch(() => null)]);
    return {
      object: 'gateway.queue',
      driver: this.queue.driver,
      processing: this.config.role !== 'api',
      max_queued: this.config.jobs.maxQueued,
      max_attempts: this.config.jobs.maxAttempts,
      counts,
      broker,
    };
  }

  /**
   * Newest first; `before` is the id of the last job of the previous page. That job may have left
   * the queue since (the admin retried or discarded the page's jobs, the usual way through it):
   * the next page still starts after the place it had, which the job keeps (deadListPlace).
   * Only an id that never was in the dead-letter queue is refused.
   */
  async listDead(limit: number, before: string | undefined): Promise<{ jobs: JobRecord[]; hasMore: boolean }> {
    let cursor: { completedAt: Date; id: string } | undefined;
    if (before !== undefined) {
      cursor = await this.repo.deadListPlace(before);
      if (!cursor) throw new GatewayError('invalid_value', `'before' must be the id of a job listed in the dead-letter queue.`, { param: 'before' });
    }
    const jobs = await this.repo.listDead(limit + 1, cursor);
    return { jobs: jobs.slice(0, limit), hasMore: jobs.length > limit };
  }

  /** Out of the dead-letter queue and queued again, with a fresh set of tries. */
  async retryDead(id: string): Promise<JobRecord> {
    const dead = await this.repo.findDead(id);
    if (!dead) throw deadNotFound(id);
    const reset = await this.repo.resetDead(id, this.clock.now());
    if (!reset) throw deadNotFound(id);
    try {
      await this.queue.requeue(id);
    } catch (error) {
      // The queue is away: leave the job where the admin found it, so the answer (503) is the truth.
      await this.repo.restoreDead(dead);
      throw error;
    }
    return reset;
  }

  async discardDead(id: string): Promise<void> {
    if (!(await this.repo.discardDead(id, this.clock.now()))) throw deadNotFound(id);
  }
}

function jobsUnavailable(cause: Error): GatewayError {
  return new GatewayError('unavailable', 'Jobs cannot be read or accepted right now (database unavailable); retry later.', { cause });
}

function notFound(id: string): GatewayError {
  return new GatewayError('not_found', `No job with id '${id}'.`);
}

function deadNotFound(id: string): GatewayError {
  return new GatewayError('not_found', `No dead-lettered job with id '${id}'.`);
}
