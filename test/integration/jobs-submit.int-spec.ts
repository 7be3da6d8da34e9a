import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AppConfig } from '../../src/config/config.js';
import { ManualClock } from '../../src/core/clock.js';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { CallbackPolicy } from '../../src/jobs/callback-policy.js';
import { type JobQueue, queueFull } from '../../src/jobs/job-queue.js';
import type { NewJob } from '../../src/jobs/job.types.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { JobsService } from '../../src/jobs/jobs.service.js';
import type { SubmitCheck } from '../../src/jobs/submit-check.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';

/** A queue whose next submits wait until the test settles them: a submit caught between insert and enqueue. */
class HeldQueue {
  readonly driver = 'bullmq' as const;
  readonly submitted: string[] = [];
  private held: Array<{ resolve: () => void; reject: (error: Error) => void }> = [];
  private waiters: Array<() => void> = [];
  hold = false;
  refuse: Error | undefined;

  assertAccepting(): void {}

  submit(jobId: string): Promise<void> {
    this.submitted.push(jobId);
    for (const wake of this.waiters.splice(0)) wake();
    if (this.refuse !== undefined) return Promise.reject(this.refuse);
    if (!this.hold) return Promise.resolve();
    return new Promise((resolve, reject) => this.held.push({ resolve, reject }));
  }

  /** Resolves once a submit reached the queue (the record is written by then). */
  reached(): Promise<void> {
    return this.held.length > 0 ? Promise.resolve() : new Promise((resolve) => this.waiters.push(resolve));
  }

  settle(error?: Error): void {
    for (const h of this.held.splice(0)) {
      if (error === undefined) h.resolve();
      else h.reject(error);
    }
  }
}

describe.each(DB_KINDS)('idempotent async submits on %s', (kind) => {
  let db: OpenedDatabase;
  let opened: JobsTestDatabase | undefined;
  let repo: JobsRepository;
  let principal: Principal;
  let keys = 0;

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'submit');
    db = opened.db;
    principal = opened.principal;
    repo = new JobsRepository(db.dataSource);
  });
  afterAll(async () => {
    await opened?.close();
  });

  function setup(): { service: JobsService; queue: HeldQueue; clock: ManualClock; input: NewJob } {
    const queue = new HeldQueue();
    const clock = new ManualClock(Date.now());
    const config = { jobs: { callbackSecret: undefined }, databaseRequestTimeoutMs: 5000 } as unknown as AppConfig;
    const policy = { refusal: () => undefined } as unknown as CallbackPolicy;
    const submitCheck = { assertRunnable: () => Promise.resolve() } as unknown as SubmitCheck;
    const service = new JobsService(repo, queue as unknown as JobQueue, config, clock, policy, submitCheck);
    keys += 1;
    const input = newJobFor(principal, { requestId: 'req-submit', idempotencyKey: `key-${keys}` });
    return { service, queue, clock, input };
  }

  it('answers a repeat 409 request_in_progress while the first submit waits for the queue; a refused first submit leaves nothing behind', async () => {
    const { service, queue, input } = setup();
    queue.hold = true;
    const first = service.submit(input);
    await queue.reached();
    const repeat = service.submit(input);
    await expect(repeat).rejects.toMatchObject({ code: 'request_in_progress', status: 409, param: 'idempotency-key', headers: { 'retry-after': '1' } });
    queue.settle(queueFull(1));
    await expect(first).rejects.toMatchObject({ code: 'queue_full' });
    const [left] = await db.dataSource.query<Array<{ n: number }>>(`SELECT count(*)::int AS n FROM jobs WHERE idempotency_key = $1`, [input.idempotencyKey]);
    expect(left?.n).toBe(0);
    // The client's next retry is a new submit, and the job it is given exists.
    queue.hold = false;
    const retried = await service.submit(input);
    expect(retried.created).toBe(true);
    expect(await repo.find(retried.job.id)).toMatchObject({ status: 'queued' });
  });

  it('gives a repeat the job once the queue confirmed it', async () => {
    const { service, queue, input } = setup();
    queue.hold = true;
    const first = service.submit(input);
    await queue.reached();
    queue.settle();
    const created = await first;
    expect(created.created).toBe(true);
    expect((await repo.find(created.job.id))?.enqueuedAt).toBeInstanceOf(Date);
    const repeat = await service.submit(input);
    expect(repeat).toMatchObject({ created: false, job: { id: created.job.id } });
    expect(queue.submitted).toEqual([created.job.id]);
  });

  it('takes over a job whose submitter died between insert and enqueue, once it has been unconfirmed for a minute', async () => {
    const { service, queue, clock, input } = setup();
    // The submitter's insert, and then nothing: it died before the queue saw the job.
    const { job } = await repo.insert(input, clock.now());
    await expect(service.submit(input)).rejects.toMatchObject({ code: 'request_in_progress' });
    expect(queue.submitted).toEqual([]);

    clock.advance(61_000);
    // The queue refusing the takeover answers 503 and keeps the record (the sweep, or a later repeat, queues it).
    queue.refuse = queueFull(1);
    await expect(service.submit(input)).rejects.toMatchObject({ code: 'queue_full' });
    expect(await repo.find(job.id)).toMatchObject({ status: 'queued', enqueuedAt: null });

    queue.refuse = undefined;
    const repeat = await service.submit(input);
    expect(repeat).toMatchObject({ created: false, job: { id: job.id } });
    expect(queue.submitted).toEqual([job.id, job.id]);
    expect((await repo.find(job.id))?.enqueuedAt).toBeInstanceOf(Date);
  });

  it('counts a job as confirmed once a try started it, even if its submitter could not record the enqueue', async () => {
    const { service, queue, clock, input } = setup();
    const { job } = await repo.insert(input, clock.now());
    expect(job.enqueuedAt).toBeNull();
    await repo.start(job.id, clock.now(), new Date(clock.nowMs() - 30_000));
    expect(await service.submit(input)).toMatchObject({ created: false, job: { id: job.id, status: 'running' } });
    expect(queue.submitted).toEqual([]);
  });

  it('never removes a job a repeat took over, when the original submit is refused after all', async () => {
    const { queue, clock, input } = setup();
    const { job } = await repo.insert(input, clock.now());
    expect(await repo.markEnqueued(job.id, clock.now())).toBe(true);
    await repo.remove(job.id);
    expect(await repo.find(job.id)).toBeDefined();
    expect(queue.submitted).toEqual([]);
  });
});
