import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuditRepository } from '../../src/audit/audit.repository.js';
import { AuditService } from '../../src/audit/audit.service.js';
import type { CompletionService } from '../../src/completion/completion.service.js';
import type { AppConfig } from '../../src/config/config.js';
import { SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import type { JobCallbacks } from '../../src/jobs/job-callbacks.js';
import { RetryJobError } from '../../src/jobs/job-queue.js';
import { JobProcessor } from '../../src/jobs/job.processor.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { UpstreamFailure } from '../../src/upstream/llm-client.js';
import { upstreamToGatewayError } from '../../src/upstream/upstream-errors.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';
import { BudgetSweeper } from '../../src/budget/budget-sweeper.service.js';

// Before: the upstream rate-limited the gateway with retry-after: 30, and the job made
// all its tries within about a second and went to the dead-letter queue. The pipeline answers an
// upstream 429 as the 502 upstream_rate_limited (never the caller's own 429), so the job must read
// the wait from that error. The delay a try hands the queue is when the job is tried again.

const clock = new SystemClock();
const logger = { logger: createLogger('silent') };
const BACKOFF_MS = 500;
const BACKOFF_MAX_MS = 60_000;
const config = { jobs: { maxAttempts: 3, backoffMs: BACKOFF_MS, backoffMaxMs: BACKOFF_MAX_MS } } as unknown as AppConfig;
const MODEL = 'openai/gpt-4o-mini';

describe.each(DB_KINDS)('a job the upstream rate-limits, on %s', (kind) => {
  let opened: JobsTestDatabase | undefined;
  let repo: JobsRepository;
  let audit: AuditService;

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'retryafter');
    repo = new JobsRepository(opened.db.dataSource);
    audit = new AuditService(new AuditRepository(opened.db.dataSource), clock, logger, {
      flushMs: 60_000,
      batchSize: 100,
      maxBuffered: 1000,
      maxBackoffMs: 50,
    });
  });
  afterAll(async () => {
    await opened?.close();
  });

  /** One try of a new job whose upstream call fails as the pipeline reports `failure`; the wait before the next try. */
  async function tryOnce(failure: UpstreamFailure): Promise<{ delayMs: number; jobId: string }> {
    if (!opened) throw new Error('no database');
    // The upstream caller made its own tries and gave up: the mapping the pipeline throws.
    const completions = { complete: () => Promise.reject(upstreamToGatewayError(failure, MODEL, { attempts: 2 })) } as unknown as CompletionService;
    const callbacks = { notify: () => undefined } as unknown as JobCallbacks;
    const processor = new JobProcessor(repo, completions, callbacks, audit, new BudgetSweeper(opened.db.dataSource, config, clock, logger), config, clock, logger);
    const { job } = await repo.insert(newJobFor(opened.principal, { requestId: 'req-retry-after' }), clock.now());
    const error: unknown = await processor.run(job.id, new AbortController().signal).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RetryJobError);
    return { delayMs: (error as RetryJobError).delayMs, jobId: job.id };
  }

  it('is tried again no sooner than the upstream’s retry-after asked, not dead-lettered within a second', async () => {
    const { delayMs, jobId } = await tryOnce(new UpstreamFailure('http', 'Rate limit exceeded', 429, 30_000));
    expect(delayMs).toBeGreaterThanOrEqual(30_000);
    expect(delayMs).toBeLessThanOrEqual(BACKOFF_MAX_MS);
    expect(await repo.find(jobId)).toMatchObject({
      status: 'queued',
      attempts: 1,
      deadLettered: false,
      error: { code: 'upstream_rate_limited', type: 'upstream_error' },
    });
  });

  it('waits at most JOBS_BACKOFF_MAX_MS, however long the upstream asks', async () => {
    const { delayMs } = await tryOnce(new UpstreamFailure('http', 'Rate limit exceeded', 429, 3_600_000));
    expect(delayMs).toBe(BACKOFF_MAX_MS);
  });

  it('keeps its own backoff when the upstream says nothing about when', async () => {
    const { delayMs } = await tryOnce(new UpstreamFailure('http', 'Rate limit exceeded', 429));
    expect(delayMs).toBeLessThanOrEqual(BACKOFF_MS);
  });
});
