import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';
import { AuditRepository } from '../../src/audit/audit.repository.js';
import { AuditService } from '../../src/audit/audit.service.js';
import type { CompletionService } from '../../src/completion/completion.service.js';
import type { CompletionCall, JsonOutcome } from '../../src/completion/completion.types.js';
import type { AppConfig } from '../../src/config/config.js';
import { SystemClock } from '../../src/core/clock.js';
import { GatewayError } from '../../src/core/errors.js';
import { createLogger } from '../../src/core/logger.js';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { JobCallbacks } from '../../src/jobs/job-callbacks.js';
import { JobProcessor, type JobRunTiming } from '../../src/jobs/job.processor.js';
import { RecheckJobError, RetryJobError } from '../../src/jobs/job-queue.js';
import type { JobRecord, NewJob } from '../../src/jobs/job.types.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';
import { BudgetSweeper } from '../../src/budget/budget-sweeper.service.js';

const clock = new SystemClock();
const logger = { logger: createLogger('silent') };
const config = { jobs: { maxAttempts: 3, backoffMs: 10, backoffMaxMs: 10 } } as unknown as AppConfig;

function outcomeWith(content: string): JsonOutcome {
  const completion = {
    id: 'c1',
    object: 'chat.completion',
    created: 1,
    model: 'openai/gpt-4o-mini',
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
  } as unknown as ChatCompletion;
  return { completion, raw: JSON.stringify(completion), costNanos: 1234n, meta: { model: 'openai/gpt-4o-mini' } } as unknown as JsonOutcome;
}

/** The pipeline, reduced to what a try sees of it: each call counted (each one would be an upstream call and a charge). */
class FakeCompletions {
  calls: CompletionCall[] = [];
  constructor(private readonly answer: (call: CompletionCall) => JsonOutcome | Promise<JsonOutcome>) {}
  complete(call: CompletionCall): Promise<JsonOutcome> {
    this.calls.push(call);
    return Promise.resolve().then(() => this.answer(call));
  }
}

/** The result write fails `failures` times (the database away for a moment), then works. */
class FlakyResultWrites extends JobsRepository {
  writes = 0;
  failures = 0;
  /** What a failing write throws: a dropped connection unless a test says otherwise. */
  failure: () => Error = () => new Error('connection terminated');
  heartbeatsFail = false;
  /** How many of the next writes putting a job back to queued fail. */
  retryLaterFailures = 0;
  override async retryLater(...args: Parameters<JobsRepository['retryLater']>): Promise<void> {
    if (this.retryLaterFailures > 0) {
      this.retryLaterFailures -= 1;
      throw new Error('connection terminated unexpectedly');
    }
    return super.retryLater(...args);
  }
  override async heartbeat(...args: Parameters<JobsRepository['heartbeat']>): Promise<void> {
    if (this.heartbeatsFail) throw new Error('connection terminated');
    return super.heartbeat(...args);
  }
  override async complete(...args: Parameters<JobsRepository['complete']>): Promise<JobRecord | undefined> {
    this.writes += 1;
    if (this.writes <= this.failures) throw this.failure();
    return super.complete(...args);
  }
}

describe.each(DB_KINDS)('job tries on %s', (kind) => {
  let db: OpenedDatabase;
  let opened: JobsTestDatabase | undefined;
  let repo: FlakyResultWrites;
  let audit: AuditService;
  let principal: Principal;

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'tries');
    db = opened.db;
    principal = opened.principal;
    repo = new FlakyResultWrites(db.dataSource);
    audit = new AuditService(new AuditRepository(db.dataSource), clock, logger, { flushMs: 60_000, batchSize: 100, maxBuffered: 1000, maxBackoffMs: 50 });
  });
  afterAll(async () => {
    await opened?.close();
  });

  const newJob = (): NewJob => newJobFor(principal, { requestId: 'req-tries' });

  function processor(completions: FakeCompletions, timing?: JobRunTiming): JobProcessor {
    const callbacks = { notify: () => undefined } as unknown as JobCallbacks;
    return new JobProcessor(repo, completions as unknown as CompletionService, callbacks, audit, new BudgetSweeper(db.dataSource, config, clock, logger), config, clock, logger, timing);
  }

  async function updatedAt(id: string): Promise<number> {
    const [row] = await db.dataSource.query<Array<{ updated_at: Date | string }>>(`SELECT updated_at FROM jobs WHERE id = $1`, [id]);
    return new Date(row?.updated_at ?? 0).getTime();
  }

  async function until(condition: () => boolean): Promise<void> {
    for (let waited = 0; !condition(); waited += 10) {
      if (waited > 5_000) throw new Error('condition not met within 5 s');
      await sleep(10);
    }
  }

  /** An upstream that answers when the test says so. */
  function held(): { completions: FakeCompletions; release: () => void } {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    return { completions: new FakeCompletions(() => released.then(() => outcomeWith('at last'))), release };
  }

  /** The completion audit row a job's try leaves, by the key that submitted it. */
  const jobAuditRow = (status: number, outcome: string): unknown =>
    expect.objectContaining({ action: 'completion', status, actor_key_id: principal.keyId, details: expect.objectContaining({ door: 'job', outcome }) });

  async function auditRows(requestId: string) {
    await audit.flush();
    return db.dataSource.query<Array<{ action: string; status: number | null; actor_key_id: string; details: Record<string, unknown> }>>(
      `SELECT action, status, actor_key_id, details FROM audit_events WHERE request_id = $1 ORDER BY seq`,
      [requestId],
    );
  }

  it('stores a completion holding U+0000 (which jsonb cannot) with U+FFFD in its place, and runs it once', async () => {
    const completions = new FakeCompletions(() => outcomeWith('a\u0000b'));
    const { job } = await repo.insert(newJob(), clock.now());
    await processor(completions).run(job.id, new AbortController().signal);
    expect(completions.calls).toHaveLength(1);
    const stored = await repo.find(job.id);
    expect(stored).toMatchObject({ status: 'completed', costNanos: 1234n, model: 'openai/gpt-4o-mini' });
    expect((stored?.result as ChatCompletion).choices[0]?.message.content).toBe('a\uFFFDb');
  });

  it('runs a job once when two deliveries of it arrive together: the second leaves it to the live run', async () => {
    const slow = new FakeCompletions(() => sleep(300).then(() => outcomeWith('once')));
    const { job } = await repo.insert(newJob(), clock.now());
    const jobs = processor(slow);
    await Promise.all([jobs.run(job.id, new AbortController().signal), jobs.run(job.id, new AbortController().signal)]);
    // Each call would have been an upstream request and a charge.
    expect(slow.calls).toHaveLength(1);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1 });
  });

  it('takes over a running job only once its heartbeat is stale (its worker died)', async () => {
    const { job } = await repo.insert(newJob(), clock.now());
    await repo.start(job.id, clock.now(), clock.now());
    const fresh = new FakeCompletions(() => outcomeWith('too early'));
    // Not a plain return, which would let the queue drop the job: it asks again once a dead run would be stale.
    await expect(processor(fresh).run(job.id, new AbortController().signal)).rejects.toBeInstanceOf(RecheckJobError);
    expect(fresh.calls).toHaveLength(0);
    expect(await repo.find(job.id)).toMatchObject({ status: 'running', attempts: 1 });

    await db.dataSource.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1`, [job.id, new Date(clock.nowMs() - 31_000)]);
    const takeover = new FakeCompletions(() => outcomeWith('taken over'));
    await processor(takeover).run(job.id, new AbortController().signal);
    expect(takeover.calls).toHaveLength(1);
    // The dead try counts: it may have been charged, and the new one must not reuse its request id.
    expect(takeover.calls[0]?.requestId).toBe(`job-${job.id}-2`);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 2 });
  });

  describe('a try whose job was taken over while it lived (its heartbeat could not be written for 30 s), then ends', () => {
    it.each([
      ['with a failure of the request’s own (4xx)', new GatewayError('invalid_value', 'The upstream refused the request.'), false],
      ['with a transient failure (5xx)', new GatewayError('upstream_error', 'The upstream failed with HTTP 503.'), false],
      ['cut short by its process’s shutdown', new GatewayError('upstream_error', 'aborted by the shutdown'), true],
    ] as const)('%s: the takeover’s charged result is kept', async (_, failure, shutdown) => {
      const { job } = await repo.insert(newJob(), clock.now());
      let endOldTry!: () => void;
      const oldTryEnds = new Promise<void>((resolve) => (endOldTry = resolve));
      const old = new FakeCompletions((call) =>
        oldTryEnds.then(() => {
          call.audited = true;
          throw failure;
        }),
      );
      const stopping = new AbortController();
      const oldRun = processor(old).run(job.id, stopping.signal);
      await until(() => old.calls.length === 1);
      await db.dataSource.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1`, [job.id, new Date(clock.nowMs() - 31_000)]);
      const takeover = held();
      const takeoverRun = processor(takeover.completions).run(job.id, new AbortController().signal);
      await until(() => takeover.completions.calls.length === 1);
      expect(takeover.completions.calls[0]?.requestId).toBe(`job-${job.id}-2`);

      if (shutdown) stopping.abort();
      endOldTry();
      await oldRun.catch(() => undefined);
      // What its submitter reads meanwhile: still running, under the takeover.
      expect(await repo.find(job.id)).toMatchObject({ status: 'running', attempts: 2, error: null });
      takeover.release();
      await takeoverRun;
      expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 2, result: { choices: [{ message: { content: 'at last' } }] } });
    });
  });

  it('keeps a running job fresh with a heartbeat for as long as its try lasts, and stops after it', async () => {
    const upstream = held();
    const { job } = await repo.insert(newJob(), clock.now());
    const running = processor(upstream.completions, { heartbeatMs: 50, staleMs: 30_000 }).run(job.id, new AbortController().signal);
    await until(() => upstream.completions.calls.length === 1);
    const startedAt = await updatedAt(job.id);
    await sleep(200);
    const later = await updatedAt(job.id);
    await sleep(200);
    expect(later).toBeGreaterThan(startedAt);
    expect(await updatedAt(job.id)).toBeGreaterThan(later);
    upstream.release();
    await running;
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1 });
    const finishedAt = await updatedAt(job.id);
    await sleep(200);
    expect(await updatedAt(job.id)).toBe(finishedAt);
  });

  it('a try whose job was taken over no longer keeps the row fresh: a dead takeover is found stale', async () => {
    const { job } = await repo.insert(newJob(), clock.now());
    const old = held();
    const timing = { heartbeatMs: 20, staleMs: 30_000 };
    const oldRun = processor(old.completions, timing).run(job.id, new AbortController().signal);
    await until(() => old.completions.calls.length === 1);
    // Its beats stop reaching the database for 30 s, and another delivery takes the job over.
    repo.heartbeatsFail = true;
    const takeover = held();
    let takeoverRun: Promise<void> | undefined;
    try {
      await db.dataSource.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1`, [job.id, new Date(clock.nowMs() - 31_000)]);
      takeoverRun = processor(takeover.completions, { heartbeatMs: 60_000, staleMs: 30_000 }).run(job.id, new AbortController().signal);
      await until(() => takeover.completions.calls.length === 1);
    } finally {
      repo.heartbeatsFail = false;
    }
    // The takeover's process dies here (it never beats again); the old try's beats reach the database again.
    const diedAt = new Date(clock.nowMs() - 31_000);
    await db.dataSource.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1`, [job.id, diedAt]);
    await sleep(200);
    expect(await updatedAt(job.id)).toBe(diedAt.getTime());
    old.release();
    takeover.release();
    await Promise.all([oldRun.catch(() => undefined), takeoverRun]);
  });

  it('never fails a try for a heartbeat that could not be written', async () => {
    const upstream = new FakeCompletions(() => sleep(200).then(() => outcomeWith('fine')));
    const { job } = await repo.insert(newJob(), clock.now());
    repo.heartbeatsFail = true;
    try {
      await processor(upstream, { heartbeatMs: 20, staleMs: 30_000 }).run(job.id, new AbortController().signal);
    } finally {
      repo.heartbeatsFail = false;
    }
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1 });
  });

  it('puts a try that shutdown cut short back in the queue without counting it', async () => {
    const stopping = new AbortController();
    const completions = new FakeCompletions(() => {
      stopping.abort();
      throw new Error('aborted by the shutdown');
    });
    const { job } = await repo.insert(newJob(), clock.now());
    await expect(processor(completions).run(job.id, stopping.signal)).rejects.toThrow(RetryJobError);
    expect(await repo.find(job.id)).toMatchObject({ status: 'queued', attempts: 0 });
    // The next try counts as the first.
    await processor(new FakeCompletions(() => outcomeWith('after the restart'))).run(job.id, new AbortController().signal);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1 });
  });

  it('retries a failed result write in the same try, never the completion', async () => {
    const completions = new FakeCompletions(() => outcomeWith('fine'));
    const { job } = await repo.insert(newJob(), clock.now());
    repo.writes = 0;
    repo.failures = 2;
    try {
      await processor(completions).run(job.id, new AbortController().signal);
    } finally {
      repo.failures = 0;
    }
    expect(completions.calls).toHaveLength(1);
    expect(repo.writes).toBe(3);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1 });
  });

  // Before, four failed writes (1.4 s) failed the job and handed the error to the queue; when that
  // write failed too the job stayed `running`, and the sweep ran it (and charged it) again.
  it('keeps writing a completed result while the database is away, and another delivery meanwhile runs nothing', async () => {
    const completions = new FakeCompletions(() => outcomeWith('fine'));
    const { job } = await repo.insert(newJob(), clock.now());
    const jobs = processor(completions);
    repo.writes = 0;
    repo.failures = 5;
    try {
      const running = jobs.run(job.id, new AbortController().signal);
      await until(() => repo.writes >= 2);
      // The sweep's delivery of a job whose row went untouched: left to the run that holds it.
      await jobs.run(job.id, new AbortController().signal);
      await running;
    } finally {
      repo.failures = 0;
    }
    expect(completions.calls).toHaveLength(1);
    expect(repo.writes).toBe(6);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 1, result: { choices: [{ message: { content: 'fine' } }] } });
  });

  it('fails the job, dead-lettered with a clear error, when the database refuses its result, instead of running it again', async () => {
    const completions = new FakeCompletions(() => outcomeWith('refused'));
    const { job } = await repo.insert(newJob(), clock.now());
    repo.writes = 0;
    repo.failures = Number.POSITIVE_INFINITY;
    repo.failure = () => Object.assign(new Error('unsupported Unicode escape sequence'), { code: '22P05' });
    try {
      await processor(completions).run(job.id, new AbortController().signal);
    } finally {
      repo.failures = 0;
      repo.failure = () => new Error('connection terminated');
    }
    expect(completions.calls).toHaveLength(1);
    expect(repo.writes).toBe(1);
    const stored = await repo.find(job.id);
    expect(stored).toMatchObject({ status: 'failed', deadLettered: true, attempts: 1, result: null, error: { code: 'internal_error', type: 'api_error' } });
    expect(stored?.error?.message).toContain('refused to store its result');
  });

  it('gives up writing an unstorable result only at shutdown, leaving the job running for the next process', async () => {
    const completions = new FakeCompletions(() => outcomeWith('kept in memory'));
    const { job } = await repo.insert(newJob(), clock.now());
    const stopping = new AbortController();
    repo.writes = 0;
    repo.failures = Number.POSITIVE_INFINITY;
    try {
      const running = processor(completions).run(job.id, stopping.signal);
      await until(() => repo.writes >= 2);
      stopping.abort();
      await running;
    } finally {
      repo.failures = 0;
    }
    expect(completions.calls).toHaveLength(1);
    expect(await repo.find(job.id)).toMatchObject({ status: 'running', attempts: 1 });
  });

  it('audits a job whose key was revoked while it waited, as the pipeline audits a refusal', async () => {
    const completions = new FakeCompletions(() => outcomeWith('never'));
    const { job } = await repo.insert(newJob(), clock.now());
    await db.dataSource.query(`UPDATE api_keys SET revoked_at = now() WHERE id = $1`, [principal.keyId]);
    try {
      await processor(completions).run(job.id, new AbortController().signal);
    } finally {
      await db.dataSource.query(`UPDATE api_keys SET revoked_at = NULL WHERE id = $1`, [principal.keyId]);
    }
    expect(completions.calls).toHaveLength(0);
    expect(await repo.find(job.id)).toMatchObject({ status: 'failed', error: { code: 'invalid_api_key' } });
    const rows = await auditRows(`job-${job.id}-1`);
    expect(rows).toEqual([
      expect.objectContaining({
        action: 'completion',
        status: 401,
        actor_key_id: principal.keyId,
        details: expect.objectContaining({ door: 'job', outcome: 'invalid_api_key', key_prefix: 'gh-tries', attempts: [], model: null, rule: null }),
      }),
    ]);
  });

  it('audits a try the pipeline refused before auditing it (routing refused the model), and only once when the pipeline audited it', async () => {
    const refused = new FakeCompletions(() => {
      throw new GatewayError('model_not_allowed', "Model 'x/y' is not allowed here.", { param: 'model' });
    });
    const { job } = await repo.insert(newJob(), clock.now());
    await processor(refused).run(job.id, new AbortController().signal);
    expect(await repo.find(job.id)).toMatchObject({ status: 'failed', error: { code: 'model_not_allowed' } });
    expect(await auditRows(`job-${job.id}-1`)).toEqual([
      expect.objectContaining({ action: 'completion', status: 400, details: expect.objectContaining({ door: 'job', outcome: 'model_not_allowed' }) }),
    ]);

    // Over budget: the pipeline writes that row itself (here: says it did), so the job adds none.
    const overBudget = new FakeCompletions((call) => {
      call.audited = true;
      throw new GatewayError('budget_exceeded', 'No budget left.');
    });
    const { job: broke } = await repo.insert(newJob(), clock.now());
    await processor(overBudget).run(broke.id, new AbortController().signal);
    expect(await repo.find(broke.id)).toMatchObject({ status: 'failed', error: { code: 'budget_exceeded' } });
    expect(await auditRows(`job-${broke.id}-1`)).toEqual([]);
  });

  it('dead-letters a job at once (no more tries, an admin may retry it) when the upstream refuses the gateway’s key or credit; retries an upstream outage', async () => {
    for (const code of ['upstream_auth', 'upstream_insufficient_credits'] as const) {
      const refused = new FakeCompletions((call) => {
        call.audited = true;
        throw new GatewayError(code, 'The upstream (openai/gpt-4o-mini) said no.');
      });
      const { job } = await repo.insert(newJob(), clock.now());
      // No RetryJobError: the queue is not asked to run it again.
      await processor(refused).run(job.id, new AbortController().signal);
      expect(refused.calls, code).toHaveLength(1);
      expect(await repo.find(job.id), code).toMatchObject({
        status: 'failed',
        deadLettered: true,
        attempts: 1,
        result: null,
        error: { code, type: 'upstream_error' },
      });
    }
    // An upstream that failed for its own reasons is worth another try, later.
    const outage = new FakeCompletions((call) => {
      call.audited = true;
      throw new GatewayError('upstream_error', 'The upstream failed with HTTP 503.');
    });
    const { job } = await repo.insert(newJob(), clock.now());
    await expect(processor(outage).run(job.id, new AbortController().signal)).rejects.toBeInstanceOf(RetryJobError);
    expect(await repo.find(job.id)).toMatchObject({ status: 'queued', deadLettered: false, attempts: 1 });
  });

  it('audits a job the queue gave up on', async () => {
    const { job } = await repo.insert(newJob(), clock.now());
    await processor(new FakeCompletions(() => outcomeWith('never'))).abandon(job.id, new Error('database away'));
    expect(await repo.find(job.id)).toMatchObject({ status: 'failed', deadLettered: true, error: { code: 'internal_error' } });
    expect(await auditRows(`job-${job.id}-0`)).toEqual([jobAuditRow(500, 'internal_error')]);
  });
  it('runs a job on the next delivery when the write putting it back to queued failed, instead of leaving it running with nobody running it', async () => {
    const completions = new FakeCompletions((call) => {
      if (completions.calls.length === 1) {
        call.audited = true;
        throw new GatewayError('upstream_error', 'The upstream failed with HTTP 503.');
      }
      return outcomeWith('second try');
    });
    const jobs = processor(completions);
    const { job } = await repo.insert(newJob(), clock.now());
    repo.retryLaterFailures = 1;
    try {
      // A plain error, not RetryJobError: the queue delivers the job again after its own backoff.
      const first = await jobs.run(job.id, new AbortController().signal).catch((error: unknown) => error);
      expect(first).toBeInstanceOf(Error);
      expect(first).not.toBeInstanceOf(RetryJobError);
    } finally {
      repo.retryLaterFailures = 0;
    }
    // The row still says running, with a fresh heartbeat (the queue's retry comes within seconds).
    expect(await repo.find(job.id)).toMatchObject({ status: 'running', attempts: 1 });

    await jobs.run(job.id, new AbortController().signal);
    expect(completions.calls.map((c) => c.requestId)).toEqual([`job-${job.id}-1`, `job-${job.id}-2`]);
    expect(await repo.find(job.id)).toMatchObject({ status: 'completed', attempts: 2, result: { choices: [{ message: { content: 'second try' } }] } });
  });

  describe('a job whose worker died during each of its JOBS_MAX_ATTEMPTS (3) tries', () => {
    /** One try that began and then lost its process: counted by start(), its heartbeat stopped long ago. */
    async function crashedTry(id: string): Promise<void> {
      expect(await repo.start(id, clock.now(), clock.now())).toBeTypeOf('object');
      await db.dataSource.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1`, [id, new Date(clock.nowMs() - 60_000)]);
    }

    async function expectDeadLetteredUnrun(id: string, completions: FakeCompletions): Promise<void> {
      expect(completions.calls).toHaveLength(0);
      const stored = await repo.find(id);
      expect(stored).toMatchObject({ status: 'failed', deadLettered: true, attempts: 3, result: null, error: { code: 'internal_error', type: 'api_error' } });
      expect(stored?.error?.message).toContain('worker stopped');
      expect(await repo.listDead(1000, undefined)).toContainEqual(expect.objectContaining({ id }));
      // The audit row of the last try, which its lost process may never have written.
      expect(await auditRows(`job-${id}-3`)).toEqual([jobAuditRow(500, 'internal_error')]);
    }

    it('is dead-lettered, not run a 4th time, when a delivery takes its stale run over (sweep, BullMQ stalled check)', async () => {
      const { job } = await repo.insert(newJob(), clock.now());
      for (let i = 0; i < 3; i += 1) await crashedTry(job.id);
      const completions = new FakeCompletions(() => outcomeWith('a 4th charge'));
      await processor(completions).run(job.id, new AbortController().signal);
      await expectDeadLetteredUnrun(job.id, completions);
    });

    it('is dead-lettered, not run again, at the next start of the inline queue (requeueRunning)', async () => {
      const { job } = await repo.insert(newJob(), clock.now());
      for (let i = 0; i < 3; i += 1) {
        await crashedTry(job.id);
        // What the inline queue's runtime does at each start of the gateway.
        await repo.requeueRunning(clock.now());
      }
      expect(await repo.find(job.id)).toMatchObject({ status: 'queued', attempts: 3 });
      const completions = new FakeCompletions(() => outcomeWith('a 4th charge'));
      await processor(completions).run(job.id, new AbortController().signal);
      await expectDeadLetteredUnrun(job.id, completions);
    });
  });
});
