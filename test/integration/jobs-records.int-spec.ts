import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { NewJob } from '../../src/jobs/job.types.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';

const now = () => new Date();

describe.each(DB_KINDS)('job records on %s', (kind) => {
  let db: OpenedDatabase;
  let opened: JobsTestDatabase | undefined;
  let repo: JobsRepository;
  let principal: Principal;

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'jobs');
    db = opened.db;
    principal = opened.principal;
    repo = new JobsRepository(db.dataSource);
  });
  afterAll(async () => {
    await opened?.close();
  });

  /** A try starts, or finds nothing to start; no job here is left running by another delivery. */
  async function start(id: string) {
    const started = await repo.start(id, now(), new Date(Date.now() - 30_000));
    if (started === 'running_elsewhere') throw new Error(`job ${id} is running elsewhere`);
    return started;
  }

  const newJob = (overrides: Partial<NewJob> = {}): NewJob => newJobFor(principal, { requestId: 'req-1', ...overrides });

  it('creates exactly one job for 20 concurrent submits with one idempotency key', async () => {
    const results = await Promise.all(Array.from({ length: 20 }, () => repo.insert(newJob({ idempotencyKey: 'same-key' }), now())));
    expect(results.filter((r) => r.created)).toHaveLength(1);
    expect(new Set(results.map((r) => r.job.id)).size).toBe(1);
    const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM jobs WHERE idempotency_key = 'same-key'`);
    expect(Number(row?.n)).toBe(1);
  });

  it('moves a job forward only: tries are counted, and a finished job never changes again', async () => {
    const { job } = await repo.insert(newJob(), now());
    expect(job).toMatchObject({ status: 'queued', attempts: 0, deadLettered: false, result: null, error: null });

    const first = await start(job.id);
    expect(first?.job).toMatchObject({ status: 'running', attempts: 1 });
    expect(first?.key).toMatchObject({ prefix: 'gh-jobs', role: 'user', cacheScope: 'user', expiresAt: null });
    await repo.retryLater(job.id, { message: 'upstream 503', type: 'upstream_error', code: 'upstream_error', param: null }, now());
    expect(await repo.find(job.id)).toMatchObject({ status: 'queued', attempts: 1, error: { code: 'upstream_error' } });

    expect((await start(job.id))?.job.attempts).toBe(2);
    // Only try 2 may store its outcome now: a late write of try 1 changes nothing.
    expect(await repo.complete(job.id, 1, { result: { object: 'chat.completion', id: 'late' }, model: 'm', costNanos: 1n }, now())).toBeUndefined();
    const done = await repo.complete(job.id, 2, { result: { object: 'chat.completion', id: 'c1' }, model: 'm', costNanos: 1234n }, now());
    expect(done).toMatchObject({ status: 'completed', attempts: 2, result: { id: 'c1' }, error: null, model: 'm', costNanos: 1234n });
    expect(done?.completedAt).toBeInstanceOf(Date);

    // A repeated delivery of the finished job: nothing starts, nothing is overwritten.
    expect(await start(job.id)).toBeUndefined();
    expect(await repo.fail(job.id, { message: 'late', type: 'api_error', code: 'internal_error', param: null }, true, now())).toBeUndefined();
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 2, deadLettered: false });
  });

  it('stores every outcome holding a lone surrogate (which jsonb refuses) with U+FFFD in its place; a whole pair stays', async () => {
    // An upstream may send an emoji cut in half as the escape \ud83d: JSON.parse makes it a lone surrogate.
    const cut = JSON.parse('"smile \\ud83d, \\ude00 and \\ud83d\\ude00"') as string;
    const clean = 'smile \uFFFD, \uFFFD and \u{1F600}';
    const { job } = await repo.insert(newJob(), now());

    await start(job.id);
    await repo.retryLater(job.id, { message: cut, type: 'upstream_error', code: 'upstream_error', param: null }, now());
    expect(await repo.find(job.id)).toMatchObject({ status: 'queued', error: { message: clean } });

    await start(job.id);
    const done = await repo.complete(
      job.id,
      2,
      { result: { object: 'chat.completion', choices: [{ message: { content: cut } }], [cut]: cut }, model: 'm', costNanos: 1n },
      now(),
    );
    expect(done).toMatchObject({ status: 'completed', result: { choices: [{ message: { content: clean } }] } });
    expect(Object.keys(done?.result as object)).toContain(clean);

    const { job: other } = await repo.insert(newJob(), now());
    await start(other.id);
    const failed = await repo.fail(other.id, { message: cut, type: 'upstream_error', code: 'upstream_error', param: null }, true, now());
    expect(failed).toMatchObject({ status: 'failed', deadLettered: true, error: { message: clean } });
  });

  it('keeps the dead-letter state: listed, reset for an admin retry, restored when the retry cannot be queued, discarded', async () => {
    const { job } = await repo.insert(newJob(), now());
    await start(job.id);
    const dead = await repo.fail(job.id, { message: 'upstream 500', type: 'upstream_error', code: 'upstream_error', param: null }, true, now());
    expect(dead).toMatchObject({ status: 'failed', deadLettered: true });
    expect((await repo.listDead(50, undefined)).map((j) => j.id)).toContain(job.id);
    expect((await repo.counts()).dead_lettered).toBeGreaterThanOrEqual(1);

    const reset = await repo.resetDead(job.id, now());
    expect(reset).toMatchObject({ status: 'queued', attempts: 0, deadLettered: false, error: null, completedAt: null });
    await repo.restoreDead(dead!);
    expect(await repo.find(job.id)).toMatchObject({ status: 'failed', deadLettered: true, attempts: 1, error: { code: 'upstream_error' } });

    expect(await repo.discardDead(job.id, now())).toBe(true);
    expect(await repo.discardDead(job.id, now())).toBe(false);
    expect(await repo.find(job.id)).toMatchObject({ status: 'failed', deadLettered: false });
    expect(await repo.resetDead(job.id, now())).toBeUndefined();
  });

  it('reads the submitting key afresh on every try: a revoked key comes back as null', async () => {
    const { job } = await repo.insert(newJob(), now());
    await db.dataSource.query(`UPDATE api_keys SET revoked_at = now() WHERE id = $1`, [principal.keyId]);
    try {
      const started = await start(job.id);
      expect(started?.job.status).toBe('running');
      expect(started?.key).toBeNull();
    } finally {
      await db.dataSource.query(`UPDATE api_keys SET revoked_at = NULL WHERE id = $1`, [principal.keyId]);
    }
  });

  it('finds unfinished jobs untouched since a moment, for the recovery sweep', async () => {
    const { job } = await repo.insert(newJob(), new Date(Date.now() - 60_000));
    const stale = await repo.unfinishedSince(new Date(Date.now() - 30_000), 1000);
    expect(stale).toContain(job.id);
    await start(job.id);
    expect(await repo.unfinishedSince(new Date(Date.now() - 30_000), 1000)).not.toContain(job.id);
    // A refused submit leaves nothing; a started job is never removed that way.
    const { job: refused } = await repo.insert(newJob(), now());
    await repo.remove(refused.id);
    expect(await repo.find(refused.id)).toBeUndefined();
    await repo.remove(job.id);
    expect(await repo.find(job.id)).toBeDefined();
  });
});
