import { type DynamicModule, Module, type Provider } from '@nestjs/common';
import { BudgetModule } from '../budget/budget.module.js';
import { CompletionModule } from '../completion/completion.module.js';
import type { AppConfig } from '../config/config.js';
import { IdentityModule } from '../identity/identity.module.js';
import { QueueAdminController } from './admin/queue-admin.controller.js';
import { BullmqJobsModule } from './bullmq-jobs.module.js';
import { CallbackPolicy } from './callback-policy.js';
import { InlineJobQueue } from './inline-job-queue.js';
import { JobCallbacks } from './job-callbacks.js';
import { exponentialBackoff, JobQueue, type JobQueueOptions } from './job-queue.js';
import { JobProcessor } from './job.processor.js';
import { JobsRetention } from './jobs-retention.js';
import { JobsRuntime } from './jobs-runtime.js';
import { JobsRepository } from './jobs.repository.js';
import { JobsService } from './jobs.service.js';
import { SubmitCheck } from './submit-check.js';
import { Jobs1764400005000 } from './migrations/1764400005000-jobs.js';
import { JobsEnqueued1764400005100 } from './migrations/1764400005100-jobs-enqueued.js';
import { JobsDeadLetteredAt1764400005200 } from './migrations/1764400005200-jobs-dead-lettered-at.js';
import { JobsFinishedIndex1764400005300 } from './migrations/1764400005300-jobs-finished-index.js';
import { JobsDeadListIndex1764400005400 } from './migrations/1764400005400-jobs-dead-list-index.js';

export const JOBS_MIGRATIONS = [Jobs1764400005000, JobsEnqueued1764400005100, JobsDeadLetteredAt1764400005200, JobsFinishedIndex1764400005300, JobsDeadListIndex1764400005400];

// The processor ends a job (completed, failed or dead-lettered) within JOBS_MAX_ATTEMPTS tries;
// these extra tries are only for failures of the bookkeeping itself (the database away).
const BOOKKEEPING_TRIES = 3;
// A try is the upstream call (bounded by UPSTREAM_DEADLINE_MS) plus what surrounds it: key check,
// routing, cache, budget, writing the outcome. Shutdown lets running tries finish within the
// deadline plus this; the workers' terminationGracePeriodSeconds is sized on it (docs/operations.md).
const TRY_OVERHEAD_MS = 10_000;

/**
 * Async jobs: the queue driver is picked here from config (inline = in-process, the embedded
 * default; bullmq = Redis) and nothing of the other is constructed: no Redis connection exists
 * in inline mode. Global so the /v1 doors reach JobsService without knowing this module's options.
 */
@Module({})
export class JobsModule {
  static forRoot(config: AppConfig): DynamicModule {
    const queue = queueDriver(config);
    return {
      module: JobsModule,
      global: true,
      imports: [CompletionModule, BudgetModule, IdentityModule, ...queue.imports],
      controllers: [QueueAdminController],
      providers: [
        ...queue.providers,
        { provide: CallbackPolicy, useFactory: () => new CallbackPolicy(config.jobs.callbackAllowedHosts) },
        JobsRepository,
        JobsService,
        JobProcessor,
        JobCallbacks,
        JobsRuntime,
        JobsRetention,
        SubmitCheck,
      ],
      exports: [JobsService],
    };
  }
}

/** The JobQueue: inline provided here; bullmq from BullmqJobsModule (@nestjs/bullmq), which exports it. */
function queueDriver(config: AppConfig): { imports: DynamicModule[]; providers: Provider[] } {
  const { jobs } = config;
  const options: JobQueueOptions = {
    concurrency: jobs.concurrency,
    maxQueued: jobs.maxQueued,
    maxTries: jobs.maxAttempts + BOOKKEEPING_TRIES,
    backoff: exponentialBackoff(jobs.backoffMs, jobs.backoffMaxMs),
    shutdownGraceMs: config.upstream.retry.deadlineMs + TRY_OVERHEAD_MS,
  };
  switch (jobs.driver) {
    case 'inline':
      return { imports: [], providers: [{ provide: JobQueue, useFactory: () => new InlineJobQueue(options) }] };
    case 'bullmq': {
      const redisUrl = config.redisUrl;
      if (!redisUrl) throw new Error('JOBS_DRIVER=bullmq needs REDIS_URL');
      return { imports: [BullmqJobsModule.forRoot({ ...options, redisUrl, prefix: `${config.redisKeyPrefix}bull` })], providers: [] };
    }
  }
}
