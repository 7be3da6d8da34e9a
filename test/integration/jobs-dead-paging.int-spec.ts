import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AppConfig } from '../../src/config/config.js';
import { SystemClock } from '../../src/core/clock.js';
import { GatewayError } from '../../src/core/errors.js';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { CallbackPolicy } from '../../src/jobs/callback-policy.js';
import type { JobQueue } from '../../src/jobs/job-queue.js';
import type { JobRecord, NewJob } from '../../src/jobs/job.types.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { JobsService } from '../../src/jobs/jobs.service.js';
import { JobsDeadLetteredAt1764400005200 } from '../../src/jobs/migrations/1764400005200-jobs-dead-lettered-at.js';
import type { SubmitCheck } from '../../src/jobs/submit-check.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';

// GET /admin/queue/dead?before=<id> pages through the dead-letter queue. The usual way through it
// is to read a page, retry or discard its jobs, and ask for the next page after the last id:
// that id is then no longer dead-lettered, and paging must still continue after its place.

const UPSTREAM_500 = { message: 'upstream 500', type: 'upstream_error', code: 'upstream_error', param: null };

describe.each(DB_KINDS)('dead-letter paging on %s', (kind) => {
  let db: OpenedDatabase;
  let opened: JobsTestDatabase | undefined;
  let repo: JobsRepository;
  let jobs: JobsService;
  let principal: Principal;
  const clock = new SystemClock();

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'deadpage');
    db = opened.db;
    principal = opened.principal;
    repo = new JobsRepository(db.dataSource);
    const queue = { requeue: () => Promise.resolve() } as unknown as JobQueue;
    const config = { jobs: { maxAttempts: 3 }, databaseRequestTimeoutMs: 5000 } as unknown as AppConfig;
    jobs = new JobsService(repo, queue, config, clock, {} as CallbackPolicy, {} as SubmitCheck);
  });
  afterAll(async () => {
    await opened?.close();
  });

  const newJob = (): NewJob => newJobFor(principal, { requestId: 'req-dead' });

  /** A job that failed its last try at `at` (dead-lettered) or failed for good (not). */
  async function failedJob(at: Date, deadLettered = true): Promise<JobRecord> {
    const { job } = await repo.insert(newJob(), at);
    await repo.start(job.id, at, new Date(at.getTime() - 30_000));
    const failed = await repo.fail(job.id, UPSTREAM_500, deadLettered, at);
    if (!failed) throw new Error('job not failed');
    return failed;
  }

  const ids = (page: { jobs: JobRecord[] }) => page.jobs.map((j) => j.id);

  it('continues after the last job of a page that was retried or discarded meanwhile', async () => {
    const base = Date.now() - 3_600_000;
    // Oldest first: dead[4] is the newest and leads the list.
    const dead: JobRecord[] = [];
    for (let i = 0; i < 6; i += 1) dead.push(await failedJob(new Date(base + i * 1000)));
    const [j0, j1, j2, j3, j4, j5] = dead as [JobRecord, JobRecord, JobRecord, JobRecord, JobRecord, JobRecord];

    const first = await jobs.listDead(2, undefined);
    expect(ids(first)).toEqual([j5.id, j4.id]);
    expect(first.hasMore).toBe(true);
    // The admin deals with the page: retries one job, discards the other.
    await jobs.retryDead(j5.id);
    await jobs.discardDead(j4.id);
    expect(await repo.find(j5.id)).toMatchObject({ status: 'queued', deadLettered: false, completedAt: null });
    expect(await repo.find(j4.id)).toMatchObject({ status: 'failed', deadLettered: false });

    // …and asks for the next page after the last id it saw (or the one before it).
    const second = await jobs.listDead(2, j4.id);
    expect(ids(second)).toEqual([j3.id, j2.id]);
    expect(second.hasMore).toBe(true);
    expect(ids(await jobs.listDead(2, j5.id))).toEqual([j3.id, j2.id]);

    // A retried job that has run again since (completed: its completed_at is new) keeps its place too.
    await jobs.retryDead(j3.id);
    const started = await repo.start(j3.id, new Date(), new Date(Date.now() - 30_000));
    const attempt = typeof started === 'object' ? started.job.attempts : 0;
    expect(await repo.complete(j3.id, attempt, { result: { id: 'c' }, model: 'm', costNanos: 1n }, new Date())).toBeDefined();
    await jobs.retryDead(j2.id);
    const third = await jobs.listDead(2, j2.id);
    expect(ids(third)).toEqual([j1.id, j0.id]);
    expect(third.hasMore).toBe(false);
    expect(ids(await jobs.listDead(2, j3.id))).toEqual([j1.id, j0.id]);
  });

  it('keeps a retried job that is dead-lettered again at its first place, so the next page neither repeats nor skips', async () => {
    // Later than every other job of this file, so these lead the list from the top.
    const base = Date.now() + 3_600_000;
    const dead: JobRecord[] = [];
    for (let i = 0; i < 4; i += 1) dead.push(await failedJob(new Date(base + i * 1000)));
    const [k0, k1, k2, k3] = dead as [JobRecord, JobRecord, JobRecord, JobRecord];
    expect(ids(await jobs.listDead(2, undefined))).toEqual([k3.id, k2.id]);

    // The admin retries the page; the upstream still refuses, and both are dead-lettered again,
    // later than anything else in the list.
    for (const job of [k3, k2]) {
      await jobs.retryDead(job.id);
      const again = new Date(base + 10_000);
      const started = await repo.start(job.id, again, new Date(again.getTime() - 30_000));
      if (typeof started !== 'object') throw new Error('retried job not started');
      expect(await repo.fail(job.id, UPSTREAM_500, true, again, started.job.attempts)).toMatchObject({ deadLettered: true, completedAt: again });
    }

    const second = await jobs.listDead(2, k2.id);
    expect(ids(second)).toEqual([k1.id, k0.id]);
    // Still listed, where they first were: a pass from the top sees each job once.
    expect(ids(await jobs.listDead(4, undefined))).toEqual([k3.id, k2.id, k1.id, k0.id]);
    expect(ids(await jobs.listDead(2, k3.id))).toEqual([k2.id, k1.id]);

    // A job dead-lettered for the first time still leads the list.
    const newest = await failedJob(new Date(base + 20_000));
    expect(ids(await jobs.listDead(2, undefined))).toEqual([newest.id, k3.id]);
  });

  it('still refuses a `before` that never was in the dead-letter queue', async () => {
    const failedForGood = await failedJob(new Date(), false);
    const { job: queued } = await repo.insert(newJob(), new Date());
    for (const before of [randomUUID(), failedForGood.id, queued.id]) {
      const refusal = await jobs.listDead(2, before).then(
        () => undefined,
        (error: unknown) => error,
      );
      expect(refusal, before).toBeInstanceOf(GatewayError);
      expect(refusal).toMatchObject({ code: 'invalid_value', param: 'before', status: 400 });
    }
  });

  it('upgrades a database whose dead-lettered jobs predate the column: they keep their place', async () => {
    const at = new Date(Date.now() - 7_200_000);
    const older = await failedJob(new Date(at.getTime() - 1000));
    const job = await failedJob(at);
    // The schema before the migration, with these jobs in it.
    await db.dataSource.query(`ALTER TABLE jobs DROP COLUMN dead_lettered_at`);
    const runner = db.dataSource.createQueryRunner();
    try {
      await new JobsDeadLetteredAt1764400005200().up(runner);
    } finally {
      await runner.release();
    }
    await jobs.retryDead(job.id);
    expect(ids(await jobs.listDead(500, job.id))[0]).toBe(older.id);
  });
});
