import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import type { ErrorBody } from '../../libs/openai-contract/src/index.js';
import { CompletionService } from '../completion/completion.service.js';
import type { CompletionCall } from '../completion/completion.types.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { type GatewayError } from '../core/errors.js';
import { toGatewayError } from '../core/http-errors.js';
import { AppLogger } from '../core/logger.js';
import type { Principal } from '../identity/principal.js';
import { JobCallbacks } from './job-callbacks.js';
import { exponentialBackoff, type JobHandler, RetryJobError } from './job-queue.js';
import type { JobRecord } from './job.types.js';
import { JobsRepository, type KeyState } from './jobs.repository.js';

/**
 * Worth another try: the upstream or a dependency failed (5xx, including upstream 502/504 and
 * 503 unavailable), or a rate limit said "later". Anything else 4xx is about the request or the
 * caller (budget, bad input, revoked key) and would fail the same way again.
 */
export function isTransient(error: GatewayError): boolean {
  return error.status >= 500 || error.code === 'rate_limit_exceeded';
}

const INVALID_KEY: ErrorBody = {
  message: 'The API key that submitted this job was revoked or has expired before the job ran.',
  type: 'authentication_error',
  code: 'invalid_api_key',
  param: null,
};

const ABANDONED: ErrorBody = {
  message: 'The job queue gave up on this job after repeated internal failures; an admin can retry it from the dead-letter queue.',
  type: 'api_error',
  code: 'internal_error',
  param: null,
};

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

  constructor(
    private readonly repo: JobsRepository,
    private readonly completions: CompletionService,
    private readonly callbacks: JobCallbacks,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Jobs' });
    this.backoff = exponentialBackoff(config.jobs.backoffMs, config.jobs.backoffMaxMs);
  }

  async run(jobId: string, signal: AbortSignal): Promise<void> {
    const started = await this.repo.start(jobId, this.clock.now());
    // Finished already (a repeated delivery) or removed (its submit was refused): nothing to do.
    if (!started) return;
    const { job, key } = started;
    const principal = this.principalFor(job, key);
    if (!principal) {
      this.finished(await this.repo.fail(job.id, INVALID_KEY, false, this.clock.now()), 'invalid_api_key');
      return;
    }
    const call: CompletionCall = {
      principal,
      // One id per try: each try is its own reservation and ledger entry.
      requestId: `job-${job.id}-${job.attempts}`,
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
      await this.failed(job, error, signal);
      return;
    }
    const done = await this.repo.complete(job.id, { result: outcome.completion, model: outcome.meta.model, costNanos: outcome.costNanos }, this.clock.now());
    this.finished(done, 'completed');
  }

  async abandon(jobId: string, error: unknown): Promise<void> {
    this.logger.error({ jobId, err: error instanceof Error ? error.message : String(error) }, 'job queue gave up on a job; dead-lettering it');
    this.finished(await this.repo.fail(jobId, ABANDONED, true, this.clock.now()), 'abandoned');
  }

  private async failed(job: JobRecord, error: unknown, signal: AbortSignal): Promise<void> {
    if (signal.aborted) {
      // Shutting down, not the job's fault: back to queued for another worker (or the next start).
      await this.repo.retryLater(job.id, job.error, this.clock.now());
      throw new RetryJobError(0, 'interrupted by shutdown');
    }
    const gatewayError = toGatewayError(error);
    const body = gatewayError.toEnvelope().error;
    if (!isTransient(gatewayError)) {
      this.finished(await this.repo.fail(job.id, body, false, this.clock.now()), gatewayError.code);
      return;
    }
    if (job.attempts < this.config.jobs.maxAttempts) {
      await this.repo.retryLater(job.id, body, this.clock.now());
      const delayMs = this.retryDelay(job.attempts, gatewayError);
      this.logger.info({ jobId: job.id, attempt: job.attempts, code: gatewayError.code, retryInMs: delayMs }, 'job failed transiently; will retry');
      throw new RetryJobError(delayMs, gatewayError.message);
    }
    this.finished(await this.repo.fail(job.id, body, true, this.clock.now()), `dead_lettered:${gatewayError.code}`);
  }

  /** Our backoff, but never sooner than a rate limit's retry-after asked for. */
  private retryDelay(attempt: number, error: GatewayError): number {
    const retryAfterSeconds = Number(error.headers?.['retry-after']);
    const asked = Number.isFinite(retryAfterSeconds) && retryAfterSeconds > 0 ? retryAfterSeconds * 1000 : 0;
    return Math.min(this.config.jobs.backoffMaxMs, Math.max(this.backoff(attempt), asked));
  }

  private principalFor(job: JobRecord, key: KeyState | null): Principal | undefined {
    if (!key) return undefined;
    if (key.expiresAt !== null && key.expiresAt.getTime() <= this.clock.nowMs()) return undefined;
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
