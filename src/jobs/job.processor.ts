import { setTimeout as sleep } from 'node:timers/promises';
import { Inject, Injectable, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import type { ErrorBody } from '../../libs/openai-contract/src/index.js';
import { AuditService } from '../audit/audit.service.js';
import { BudgetSweeper } from '../budget/budget-sweeper.service.js';
import { CompletionService } from '../completion/completion.service.js';
import type { CompletionCall, JsonOutcome } from '../completion/completion.types.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { type ErrorCode, type GatewayError } from '../core/errors.js';
import { toGatewayError } from '../core/http-errors.js';
import { AppLogger } from '../core/logger.js';
import { isDataError } from '../database/sql-errors.js';
import type { Principal } from '../identity/principal.js';
import { JobCallbacks } from './job-callbacks.js';
import { exponentialBackoff, type JobHandler, RecheckJobError, RetryJobError } from './job-queue.js';
import type { JobRecord } from './job.types.js';
import { JobsRepository, type KeyState } from './jobs.repository.js';

/**
 * Upstream failures that another try would meet again, whatever the backoff: the upstream
 * rejected the gateway's own credentials (401/403) or its account is out of credit (402). The
 * sync path stops on them at once too (upstream-errors.ts `failureAction`: 'stop'); they are
 * 502s only so that they never look like the caller's own 401/402. An upstream 400/413/422 (the
 * request itself) already arrives as the caller's 4xx (`invalid_value`, `payload_too_large`).
 */
const PERMANENT_UPSTREAM: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['upstream_auth', 'upstream_insufficient_credits']);

/**
 * Worth another try: the upstream or a dependency failed (5xx, including upstream 502/504 and
 * 503 unavailable), or a rate limit said "later". Anything else 4xx is about the request or the
 * caller (budget, bad input, revoked key) and would fail the same way again, as would an
 * upstream that refuses the gateway's key or credit (PERMANENT_UPSTREAM).
 */
export function isTransient(error: GatewayError): boolean {
  if (PERMANENT_UPSTREAM.has(error.code)) return false;
  return error.status >= 500 || error.code === 'rate_limit_exceeded';
}

const INVALID_KEY: ErrorBody = {
  message: 'The API key that submitted this job was revoked or has expired before the job ran.',
  type: 'authentication_error',
  code: 'invalid_api_key',
  param: null,
};

const RESULT_NOT_STORED: ErrorBody = {
  message:
    'The completion succeeded (and was charged) but the database refused to store its result; an admin can retry the job from the dead-letter queue, which runs it again.',
  type: 'api_error',
  code: 'internal_error',
  param: null,
};

const ABANDONED: ErrorBody = {
  message: 'The job queue gave up on this job after repeated internal failures; an admin can retry it from the dead-letter queue.',
  type: 'api_error',
  code: 'internal_error',
  param: null,
};

const WORKER_LOST: ErrorBody = {
  message:
    'The job used up its tries without any of them recording an outcome (its worker stopped during each, e.g. killed for memory); it was not run again. An admin can retry it from the dead-letter queue.',
  type: 'api_error',
  code: 'internal_error',
  param: null,
};

// Once the completion has returned, writing it is retried here and never by the queue: a queue
// retry would run the try again, calling (and charging for) the upstream once more. So it is
// retried until the database answers (a short outage must not cost a second call), backing off
// to STORE_BACKOFF_MAX_MS; only a shutdown stops it, after STORE_TRIES more tries.
const STORE_TRIES = 4;
const STORE_BACKOFF_MS = 200;
const STORE_BACKOFF_MAX_MS = 5000;

export interface JobRunTiming {
  /** How often a running try refreshes its job's `updated_at`. */
  heartbeatMs: number;
  /** A running job untouched this long has lost its worker: another delivery may take it over. */
  staleMs: number;
}

/** Overrides RUN_TIMING (tests); nothing in the app provides it. */
export const JOB_RUN_TIMING = Symbol('JOB_RUN_TIMING');

// Stale after three missed heartbeats, which is also BullMQ's default lock duration: a worker
// that lost its lock but is alive keeps its job, one that died loses it soon after its lock.
const RUN_HEARTBEAT_MS = 10_000;
const RUN_STALE_MS = 30_000;
const RUN_TIMING: JobRunTiming = { heartbeatMs: RUN_HEARTBEAT_MS, staleMs: RUN_STALE_MS };

/**
 * Runs one try of a job through the very pipeline sync requests use (`CompletionService.complete`):
 * routing, cache, budget, ledger and audit apply to jobs as they are. The principal is rebuilt
 * from the ids stored at submit, with the key checked again now: a key revoked while its jobs
 * waited must not spend on their behalf.
 */
@Injectable()
export class JobProcessor implements JobHandler {
  private readonly logger: Logger;
  private readonly backoff: (tries: number) => number;
  private readonly timing: JobRunTiming;
  /**
   * Jobs a try of this process is running. Another delivery of one of them (the sweep requeues
   * a job whose row went untouched, as while the database was away) must not take it over as a
   * lost run: this process still holds its outcome, and a second try would call and charge the
   * upstream again.
   */
  private readonly runningHere = new Set<string>();
  /**
   * Jobs whose try in this process ended without writing its outcome (the database failed the
   * bookkeeping), by the try's attempt number and when it ended. The row still says `running`
   * with a fresh heartbeat, yet nothing runs it: this process's next delivery of the job takes it
   * over at once instead of waiting for the heartbeat to go stale.
   */
  private readonly endedUnrecorded = new Map<string, { attempt: number; atMs: number }>();

  constructor(
    private readonly repo: JobsRepository,
    private readonly completions: CompletionService,
    private readonly callbacks: JobCallbacks,
    private readonly audit: AuditService,
    private readonly budgets: BudgetSweeper,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
    @Optional() @Inject(JOB_RUN_TIMING) timing?: JobRunTiming,
  ) {
    this.logger = appLogger.logger.child({ context: 'Jobs' });
    this.backoff = exponentialBackoff(config.jobs.backoffMs, config.jobs.backoffMaxMs);
    this.timing = timing ?? RUN_TIMING;
  }

  async run(jobId: string, signal: AbortSignal): Promise<void> {
    if (this.runningHere.has(jobId)) {
      this.logger.info({ jobId }, 'job is running in this process; this delivery leaves it to that run');
      return;
    }
    this.runningHere.add(jobId);
    try {
      await this.runHere(jobId, signal);
    } finally {
      this.runningHere.delete(jobId);
    }
  }

  private async runHere(jobId: string, signal: AbortSignal): Promise<void> {
    const now = this.clock.now();
    const started = await this.repo.start(jobId, now, new Date(now.getTime() - this.timing.staleMs), this.endedUnrecorded.get(jobId)?.attempt);
    this.endedUnrecorded.delete(jobId);
    if (started === 'running_elsewhere') {
      // Its queue lock lapsed (Redis away, a blocked event loop) but its heartbeat did not, or its
      // try ended in another process whose bookkeeping failed. Returning would let the queue drop
      // the job until the 5-minute sweep; asked again once a dead run's heartbeat is stale, this
      // finds the job finished (a no-op) or takes it over.
      this.logger.info({ jobId }, 'job is running elsewhere; this delivery leaves it to that run and checks again later');
      throw new RecheckJobError(this.timing.staleMs, 'the job is running elsewhere');
    }
    // Finished already (a repeated delivery) or removed (its submit was refused): nothing to do.
    if (!started) return;
    // start() counted this try too, so a job whose every try lost its worker (OOM, SIGKILL) gets
    // here past the cap: the failure path, which dead-letters at the cap, never saw those tries
    // end, and running it again would be charged again and could crash its process again.
    if (started.job.attempts > this.config.jobs.maxAttempts) {
      await this.workerLost(started.job);
      return;
    }
    const heartbeat = this.heartbeat(started.job.id, started.job.attempts);
    try {
      await this.runTry(started.job, started.key, signal);
    } catch (error) {
      if (!(error instanceof RetryJobError)) this.rememberEndedUnrecorded(started.job);
      throw error;
    } finally {
      clearInterval(heartbeat);
    }
  }

  private rememberEndedUnrecorded(job: JobRecord): void {
    const nowMs = this.clock.nowMs();
    // Older ones are stale by now, and any delivery takes them over anyway.
    for (const [id, ended] of this.endedUnrecorded) if (ended.atMs <= nowMs - this.timing.staleMs) this.endedUnrecorded.delete(id);
    this.endedUnrecorded.set(job.id, { attempt: job.attempts, atMs: nowMs });
  }

  private async workerLost(job: JobRecord): Promise<void> {
    this.logger.error({ jobId: job.id, attempts: job.attempts - 1 }, 'job used up its tries without an outcome (its worker was lost); dead-lettering it');
    // Not counted: this try never ran; the job shows the tries that did.
    const failed = await this.repo.fail(job.id, WORKER_LOST, true, this.clock.now(), job.attempts, false);
    this.finished(failed, 'dead_lettered:worker_lost');
    if (failed) await this.auditEnded(failed, 'internal_error');
  }

  private async runTry(job: JobRecord, key: KeyState | null, signal: AbortSignal): Promise<void> {
    const principal = this.principalFor(job, key);
    if (!principal) {
      const failed = await this.repo.fail(job.id, INVALID_KEY, false, this.clock.now(), job.attempts);
      this.finished(failed, 'invalid_api_key');
      if (failed) await this.auditEnded(failed, 'invalid_api_key');
      return;
    }
    const call: CompletionCall = {
      principal,
      requestId: tryRequestId(job),
      body: job.requestBody,
      taskType: job.taskType ?? undefined,
      door: 'job',
      signal,
      cacheControl: job.cacheControl,
    };
    let outcome;
    try {
      outcome = await this.completions.complete(call);
    } catch (error) {
      // The pipeline audits what it ran or refused; one it turned away before that (routing refused
      // the model) is for the door to record, as the HTTP doors' audit hook does.
      if (call.audited !== true) this.recordEnded(principal, job, call.requestId, toGatewayError(error).code);
      await this.failed(job, error, signal);
      return;
    }
    await this.store(job, outcome, signal);
  }

  async abandon(jobId: string, error: unknown): Promise<void> {
    this.logger.error({ jobId, err: error instanceof Error ? error.message : String(error) }, 'job queue gave up on a job; dead-lettering it');
    const failed = await this.repo.fail(jobId, ABANDONED, true, this.clock.now());
    this.finished(failed, 'abandoned');
    if (failed) await this.auditEnded(failed, 'internal_error');
  }

  /**
   * Keeps the running job's row fresh for the whole try, outcome writes included, so that no
   * other delivery takes it over and the sweep leaves it alone. Best effort: a try is never failed
   * for a missed beat (three in a row only let another worker run the job again).
   */
  private heartbeat(jobId: string, attempt: number): NodeJS.Timeout {
    let beating = false;
    let warned = false;
    const timer = setInterval(() => {
      // A database that hangs gets one beat at a time, not a pile of them.
      if (beating) return;
      beating = true;
      this.repo
        .heartbeat(jobId, this.clock.now(), attempt)
        .catch((error: unknown) => {
          if (warned) return;
          warned = true;
          this.logger.warn({ jobId, err: (error as Error).message }, 'could not refresh a running job’s heartbeat; another delivery may take it over');
        })
        .finally(() => {
          beating = false;
        });
    }, this.timing.heartbeatMs);
    timer.unref();
    return timer;
  }

  /**
   * Stores a try's completion, retrying the write until the database takes it: the try was
   * charged, and a job left `running` would be run (and charged) again once taken over. The
   * heartbeat goes on meanwhile. Only a shutdown gives up, after STORE_TRIES more tries: that
   * outcome is logged (no content) and the job is run again by the next process that takes it.
   * A result the database refuses (a data error: it would be refused again) fails the job,
   * dead-lettered. Conditional on this try: a takeover's own outcome is never overwritten.
   */
  private async store(job: JobRecord, outcome: JsonOutcome, signal: AbortSignal): Promise<void> {
    const result = { result: outcome.completion, model: outcome.meta.model, costNanos: outcome.costNanos };
    let triesLeftAtShutdown = STORE_TRIES;
    for (let tryNo = 1; ; tryNo += 1) {
      try {
        const done = await this.repo.complete(job.id, job.attempts, result, this.clock.now());
        if (tryNo > 1) this.logger.info({ jobId: job.id, tries: tryNo }, 'stored a completed job’s result once the database answered');
        this.finished(done, 'completed');
        return;
      } catch (error) {
        if (isDataError(error)) {
          // The content itself was refused: storing it again would fail the same way.
          this.logger.error({ jobId: job.id, err: (error as Error).message }, 'the database refused a completed job’s result; failing the job');
          this.finished(await this.repo.fail(job.id, RESULT_NOT_STORED, true, this.clock.now(), job.attempts), 'result_not_stored');
          return;
        }
        if (tryNo === 1) this.logger.warn({ jobId: job.id, err: (error as Error).message }, 'could not store a completed job’s result; retrying until the database answers');
        if (signal.aborted && --triesLeftAtShutdown <= 0) {
          this.logger.error(
            { jobId: job.id, attempt: job.attempts, model: outcome.meta.model, costNanos: outcome.costNanos.toString(), err: (error as Error).message },
            'shutting down with a completed job’s result unstored: the job stays running and will be run again',
          );
          return;
        }
      }
      // A shutdown wakes the wait, and its last tries come quickly: the shutdown's grace is short.
      if (signal.aborted) await sleep(STORE_BACKOFF_MS);
      else await sleep(Math.min(STORE_BACKOFF_MS * 2 ** Math.min(tryNo - 1, 10), STORE_BACKOFF_MAX_MS), undefined, { signal }).catch(() => undefined);
    }
  }

  /**
   * The audit row of a job that ended before the pipeline saw its try (a key revoked while it
   * waited, the queue giving up): the row the pipeline writes for a refusal, so every try leaves
   * one. It names the submitting key as it is now; never fails the job's bookkeeping.
   */
  private async auditEnded(job: JobRecord, code: string): Promise<void> {
    try {
      const key = await this.repo.keyOf(job.keyId);
      if (key) this.recordEnded(this.principalOf(job, key), job, tryRequestId(job), code);
      else this.logger.warn({ jobId: job.id }, 'the key of a finished job is gone; no audit row for its end');
    } catch (error) {
      this.logger.warn({ jobId: job.id, err: (error as Error).message }, 'could not read the key of a finished job; no audit row for its end');
    }
  }

  private recordEnded(principal: Principal, job: JobRecord, requestId: string, code: string): void {
    // No route: such a try ended before routing, or routing refused it (task type, rule and version are null).
    this.audit.recordCompletion({ requestId, principal, door: 'job', body: job.requestBody }, undefined, undefined, [], code);
  }

  private async failed(job: JobRecord, error: unknown, signal: AbortSignal): Promise<void> {
    if (signal.aborted) {
      // Shutting down, not the job's fault: back to queued for another worker (or the next start),
      // and the try it did not finish is not counted against it.
      await this.repo.retryLater(job.id, job.error, this.clock.now(), job.attempts, false);
      throw new RetryJobError(0, 'interrupted by shutdown');
    }
    const gatewayError = toGatewayError(error);
    const body = gatewayError.toEnvelope().error;
    if (gatewayError.code === 'budget_exceeded' && (await this.earlierTryHolds(job))) {
      // Refused on its own dead try's hold (its worker died before it settled; the sweep releases
      // it within BUDGET_RESERVATION_TTL_MS): waits for that, this try not counted, instead of
      // failing for good on a budget that can cover it. Never by freeing the hold early: a worker
      // that was only cut off from the database may still be running that try.
      await this.repo.retryLater(job.id, body, this.clock.now(), job.attempts, false);
      const delayMs = this.config.jobs.backoffMaxMs;
      this.logger.info({ jobId: job.id, attempt: job.attempts, retryInMs: delayMs }, "job's budget is held by an earlier try that never settled; will try again once it is released");
      // Not a try for the queue either: the wait may take several of these.
      throw new RecheckJobError(delayMs, gatewayError.message);
    }
    if (!isTransient(gatewayError)) {
      // A refused key or exhausted credit is the operator's to fix, not the request's: no more
      // tries, but dead-lettered, so an admin can retry the jobs once the account works again.
      const deadLettered = PERMANENT_UPSTREAM.has(gatewayError.code);
      this.finished(
        await this.repo.fail(job.id, body, deadLettered, this.clock.now(), job.attempts),
        deadLettered ? `dead_lettered:${gatewayError.code}` : gatewayError.code,
      );
      return;
    }
    if (job.attempts < this.config.jobs.maxAttempts) {
      await this.repo.retryLater(job.id, body, this.clock.now(), job.attempts);
      const delayMs = this.retryDelay(job.attempts, gatewayError);
      this.logger.info({ jobId: job.id, attempt: job.attempts, code: gatewayError.code, retryInMs: delayMs }, 'job failed transiently; will retry');
      throw new RetryJobError(delayMs, gatewayError.message);
    }
    this.finished(await this.repo.fail(job.id, body, true, this.clock.now(), job.attempts), `dead_lettered:${gatewayError.code}`);
  }

  /** Whether an earlier try of this job still holds budget (it ended without settling). */
  private async earlierTryHolds(job: JobRecord): Promise<boolean> {
    const earlier: string[] = [];
    for (let attempt = 1; attempt < job.attempts; attempt++) earlier.push(tryRequestId({ id: job.id, attempts: attempt }));
    try {
      return await this.budgets.holds(earlier, job.userId);
    } catch {
      // Not knowable now: the 402 stands, as it would have without this check.
      return false;
    }
  }

  /**
   * Our backoff, but never sooner than a rate limit asked for: the upstream's retry-after (kept on
   * the mapped 502, which carries no header) or the gateway's own 429's. Both capped by
   * JOBS_BACKOFF_MAX_MS, the operator's bound on any wait between tries: an upstream asking for
   * hours (or a retry-after date far ahead) must not park jobs for that long, and a job that still
   * meets the limit after the cap ends in the dead-letter queue, where an admin can retry it.
   */
  private retryDelay(attempt: number, error: GatewayError): number {
    const retryAfterSeconds = Number(error.headers?.['retry-after']);
    const asked = Math.max(Number.isFinite(retryAfterSeconds) && retryAfterSeconds > 0 ? retryAfterSeconds * 1000 : 0, error.retryAfterMs ?? 0);
    return Math.min(this.config.jobs.backoffMaxMs, Math.max(this.backoff(attempt), asked));
  }

  private principalFor(job: JobRecord, key: KeyState | null): Principal | undefined {
    if (!key) return undefined;
    if (key.expiresAt !== null && key.expiresAt.getTime() <= this.clock.nowMs()) return undefined;
    return this.principalOf(job, key);
  }

  private principalOf(job: JobRecord, key: KeyState): Principal {
    return {
      keyId: job.keyId,
      keyPrefix: key.prefix,
      userId: job.userId,
      departmentId: job.departmentId,
      role: key.role,
      cacheScope: key.cacheScope,
      expiresAt: key.expiresAt?.getTime(),
    };
  }

  private finished(job: JobRecord | undefined, outcome: string): void {
    // undefined: another delivery of the same job finished it first; it sent the callback.
    if (!job) return;
    this.logger.info({ jobId: job.id, status: job.status, attempts: job.attempts, deadLettered: job.deadLettered, outcome }, 'job finished');
    this.callbacks.notify(job);
  }
}

/** One id per try: each try is its own reservation, ledger entry and audit row. */
function tryRequestId(job: Pick<JobRecord, 'id' | 'attempts'>): string {
  return `job-${job.id}-${job.attempts}`;
}
