import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AppConfig } from '../../src/config/config.js';
import { ManualClock } from '../../src/core/clock.js';
import { isGatewayError } from '../../src/core/errors.js';
import { createLogger } from '../../src/core/logger.js';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { CallbackPolicy } from '../../src/jobs/callback-policy.js';
import type { JobQueue } from '../../src/jobs/job-queue.js';
import type { JobRecord, NewJob } from '../../src/jobs/job.types.js';
import { JobsRetention } from '../../src/jobs/jobs-retention.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { JobsService } from '../../src/jobs/jobs.service.js';
import { JobsFinishedIndex1764400005300 } from '../../src/jobs/migrations/1764400005300-jobs-finished-index.js';
import type { SubmitCheck } from '../../src/jobs/submit-check.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';

// Before: an async idempotency-key was the job's for ever (a month-old job replayed
// for a recurring key, or 422 with a new body), and no job row was ever deleted.

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
const logger = { logger: createLogger('silent') };
const RESULT = { object: 'chat.completion', id: 'c-day-1' };

/** A queue that takes every submit at once. */
const acceptingQueue = {
  driver: 'bullmq',
  assertAccepting: () => undefined,
  submit: () => Promise.resolve(),
  requeue: () => Promise.resolve(),
} as unknown as JobQueue;
const noSubmitCheck = { assertRunnable: () => Promise.resolve() } as unknown as SubmitCheck;

describe.each(DB_KINDS)('async idempotency-keys and job retention on %s', (kind) => {
  let db: OpenedDatabase;
  let opened: JobsTestDatabase | undefined;
  let repo: JobsRepository;
  let principal: Principal;
  let clock: ManualClock;
  let service: JobsService;
  let keys = 0;

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'retention');
    db = opened.db;
    principal = opened.principal;
    repo = new JobsRepository(db.dataSource);
    clock = new ManualClock(Date.parse('2026-02-01T08:00:00Z'));
    const config = { jobs: { callbackSecret: undefined }, databaseRequestTimeoutMs: 5000 } as unknown as AppConfig;
    service = new JobsService(repo, acceptingQueue, config, clock, { refusal: () => undefined } as unknown as CallbackPolicy, noSubmitCheck);
  });
  afterAll(async () => {
    await opened?.close();
  });

  it('has the partial index the sweep reads, built valid by its concurrent migration', async () => {
    const rows = await db.dataSource.query<Array<{ valid: boolean; definition: string }>>(
      `SELECT i.indisvalid AS valid, pg_get_indexdef(i.indexrelid) AS definition
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_finished_idx'`,
    );
    expect(rows).toHaveLength(1);
    expect(rows[0]?.valid).toBe(true);
    expect(rows[0]?.definition).toContain('(completed_at) WHERE');
  });

  it('rebuilds the index when an earlier concurrent build was cut short (left invalid)', async () => {
    const validity = async () =>
      (await db.dataSource.query<Array<{ valid: boolean }>>(`SELECT i.indisvalid AS valid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_finished_idx'`)).map(
        (r) => r.valid,
      );
    // What a build killed mid-way leaves: the index exists, marked invalid (never used by a query).
    await db.dataSource.query(`UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'jobs_finished_idx'::regclass`);
    expect(await validity()).toEqual([false]);
    const runner = db.dataSource.createQueryRunner();
    try {
      await new JobsFinishedIndex1764400005300().up(runner);
    } finally {
      await runner.release();
    }
    expect(await validity()).toEqual([true]);
  });

  function submitOf(key: string, content: string): NewJob {
    return newJobFor(principal, {
      idempotencyKey: key,
      bodyHash: `hash-${content}`,
      body: { messages: [{ role: 'user', content }] },
      requestId: `req-${content}`,
    });
  }

  function nextKey(): string {
    keys += 1;
    return `nightly-report-${keys}`;
  }

  /** A try runs the job to the end now. */
  async function finish(job: JobRecord, outcome: 'completed' | 'failed' | 'dead_lettered'): Promise<void> {
    const started = await repo.start(job.id, clock.now(), clock.now());
    const attempt = typeof started === 'object' ? started.job.attempts : 0;
    if (outcome === 'completed') await repo.complete(job.id, attempt, { result: RESULT, model: 'm', costNanos: 1n }, clock.now());
    else await repo.fail(job.id, { message: 'no', type: 'upstream_error', code: 'upstream_error', param: null }, outcome === 'dead_lettered', clock.now());
  }

  it('replays the job to a repeat within 24 h of its submit, and gives a new job for the key after that, the old job still readable', async () => {
    const key = nextKey();
    const day1 = await service.submit(submitOf(key, 'report for day 1'));
    expect(day1.created).toBe(true);
    await finish(day1.job, 'completed');

    clock.advance(DAY_MS - 1000);
    expect(await service.submit(submitOf(key, 'report for day 1'))).toMatchObject({ created: false, job: { id: day1.job.id, status: 'completed' } });
    await expect(service.submit(submitOf(key, 'report for day 2'))).rejects.toMatchObject({ code: 'idempotency_key_reused', status: 422 });

    clock.advance(2000);
    const day2 = await service.submit(submitOf(key, 'report for day 2'));
    expect(day2).toMatchObject({ created: true, job: { status: 'queued' } });
    expect(day2.job.id).not.toBe(day1.job.id);
    // The month-old answer is no longer what the key gets; a repeat of the new submit gets the new job.
    expect(await service.submit(submitOf(key, 'report for day 2'))).toMatchObject({ created: false, job: { id: day2.job.id } });
    expect(await repo.find(day1.job.id)).toMatchObject({ id: day1.job.id, status: 'completed', result: RESULT });
  });

  it('keeps a key past 24 h while its job is unfinished (queued, running, or queued again by an admin retry)', async () => {
    const key = nextKey();
    const first = await service.submit(submitOf(key, 'slow'));
    clock.advance(DAY_MS + HOUR_MS);
    expect(await service.submit(submitOf(key, 'slow'))).toMatchObject({ created: false, job: { id: first.job.id, status: 'queued' } });
    await repo.start(first.job.id, clock.now(), clock.now());
    expect(await service.submit(submitOf(key, 'slow'))).toMatchObject({ created: false, job: { id: first.job.id, status: 'running' } });

    const dead = await service.submit(submitOf(nextKey(), 'dead'));
    await finish(dead.job, 'dead_lettered');
    clock.advance(DAY_MS + HOUR_MS);
    expect(await service.retryDead(dead.job.id)).toMatchObject({ status: 'queued' });
    const deadKey = dead.job.idempotencyKey ?? '';
    expect(await service.submit(submitOf(deadKey, 'dead'))).toMatchObject({ created: false, job: { id: dead.job.id, status: 'queued' } });
  });

  it('gives concurrent submits with the same expired key exactly one new job', async () => {
    const key = nextKey();
    const old = await service.submit(submitOf(key, 'day 1'));
    await finish(old.job, 'failed');
    clock.advance(DAY_MS + 1000);

    const outcomes = await Promise.all(
      Array.from({ length: 8 }, () =>
        service.submit(submitOf(key, 'day 2')).then(
          (r) => ({ created: r.created, id: r.job.id }),
          (error: unknown) => {
            // A repeat that finds the new job not yet confirmed by the queue is told to ask again (409).
            if (isGatewayError(error) && error.code === 'request_in_progress') return { created: false, id: undefined };
            throw error;
          },
        ),
      ),
    );
    const created = outcomes.filter((o) => o.created);
    expect(created).toHaveLength(1);
    const newId = created[0]?.id;
    for (const o of outcomes) if (o.id !== undefined) expect(o.id).toBe(newId);
    const rows = await db.dataSource.query<Array<{ id: string }>>(`SELECT id FROM jobs WHERE user_id = $1 AND request_id = 'req-day 2'`, [principal.userId]);
    expect(rows.map((r) => r.id)).toEqual([newId]);
    expect(await repo.find(old.job.id)).toMatchObject({ status: 'failed' });
  });

  it('deletes finished jobs past JOBS_RETENTION_HOURS, never those dead-lettered or unfinished', async () => {
    await db.dataSource.query(`DELETE FROM jobs`);
    const retention = (hours: number) => new JobsRetention(repo, { role: 'all', jobs: { retentionHours: hours } } as unknown as AppConfig, clock, logger);
    const at = (content: string) => service.submit(submitOf(nextKey(), content)).then((r) => r.job);

    const completed = await at('completed 31 days ago');
    await finish(completed, 'completed');
    const failed = await at('failed 31 days ago');
    await finish(failed, 'failed');
    const dead = await at('dead-lettered 31 days ago');
    await finish(dead, 'dead_lettered');
    const discarded = await at('dead-lettered, then discarded');
    await finish(discarded, 'dead_lettered');
    await service.discardDead(discarded.id);
    const queued = await at('queued 31 days ago');
    clock.advance(30 * DAY_MS + HOUR_MS);
    const recent = await at('completed an hour ago');
    await finish(recent, 'completed');
    clock.advance(HOUR_MS);

    expect(await retention(0).sweep()).toBe(0);
    expect(await retention(720).sweep()).toBe(3);
    for (const gone of [completed, failed, discarded]) expect(await repo.find(gone.id), gone.requestId).toBeUndefined();
    for (const kept of [dead, queued, recent]) expect(await repo.find(kept.id), kept.requestId).toBeDefined();
    expect(await repo.findDead(dead.id)).toMatchObject({ status: 'failed', deadLettered: true });
    // Its key went with it: the next submit with it is a new job.
    expect(await service.submit(submitOf(completed.idempotencyKey ?? '', 'completed 31 days ago'))).toMatchObject({ created: true });
  });

  it('deletes in bounded batches, oldest first, until nothing is left to delete', async () => {
    await db.dataSource.query(`DELETE FROM jobs`);
    const finishedAt = new Date(clock.nowMs() - 40 * DAY_MS);
    await db.dataSource.query(
      `INSERT INTO jobs (user_id, department_id, key_id, door, request_body, cache_control, request_id, body_hash, status,
                         attempts, created_at, started_at, completed_at, updated_at)
       SELECT $1, $2, $3, 'chat', '{}'::jsonb, '{}'::jsonb, 'bulk-' || i, 'h', 'completed', 1,
              $4::timestamptz, $4::timestamptz, $4::timestamptz + i * interval '1 second', $4::timestamptz
         FROM generate_series(1, 2500) AS i`,
      [principal.userId, principal.departmentId, principal.keyId, finishedAt],
    );
    // One batch: the oldest two.
    expect(await repo.deleteFinished(clock.now(), 2)).toBe(2);
    const [oldest] = await db.dataSource.query<Array<{ request_id: string }>>(`SELECT request_id FROM jobs ORDER BY completed_at LIMIT 1`);
    expect(oldest?.request_id).toBe('bulk-3');
    // A round works through several batches.
    const retention = new JobsRetention(repo, { role: 'all', jobs: { retentionHours: 720 } } as unknown as AppConfig, clock, logger);
    expect(await retention.sweep()).toBe(2498);
    const [left] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM jobs`);
    expect(Number(left?.n)).toBe(0);
  });
});
