import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { AuditService } from '../../src/audit/audit.service.js';
import type { CompletionCall } from '../../src/completion/completion.types.js';
import { type AppConfig, loadConfig } from '../../src/config/config.js';
import { ManualClock } from '../../src/core/clock.js';
import { type AppLogger, createLogger } from '../../src/core/logger.js';
import { IdempotencyRepository } from '../../src/idempotency/idempotency.repository.js';
import { type IdempotencyClaim, IdempotencyService } from '../../src/idempotency/idempotency.service.js';
import type { Principal } from '../../src/identity/principal.js';
import type { CallbackPolicy } from '../../src/jobs/callback-policy.js';
import type { JobQueue } from '../../src/jobs/job-queue.js';
import { JobsRepository } from '../../src/jobs/jobs.repository.js';
import { JobsService } from '../../src/jobs/jobs.service.js';
import type { SubmitCheck } from '../../src/jobs/submit-check.js';
import { DB_KINDS } from '../support/databases.js';
import { type JobsTestDatabase, newJobFor, openJobsTestDatabase } from '../support/jobs-database.js';

const acceptingQueue = { driver: 'bullmq', assertAccepting: () => undefined, submit: () => Promise.resolve() } as unknown as JobQueue;
const noSubmitCheck = { assertRunnable: () => Promise.resolve() } as unknown as SubmitCheck;

/**
 * Both sides meet here before their cross-door check: each has written its own claim (the sync
 * row, the job) and neither has looked at the other's yet, the closest race there is. Gives up
 * waiting after a while, so a side that never checks fails the test instead of hanging it.
 */
class Barrier {
  private arrived = 0;
  private open!: () => void;
  private readonly opened = new Promise<void>((resolve) => (this.open = resolve));

  async meet(): Promise<void> {
    this.arrived += 1;
    if (this.arrived === 2) this.open();
    await Promise.race([this.opened, new Promise((resolve) => setTimeout(resolve, 5000))]);
  }
}

/**
 * A sync call and an async submit with one key racing each other: at most one of them may get
 * the key (else one key names two requests, run and charged twice). The sides do not lock each
 * other out; each checks the other's table after its own write has committed.
 */
describe.each(DB_KINDS)('one idempotency-key for a racing sync call and async submit on %s', (kind) => {
  let opened: JobsTestDatabase | undefined;
  let principal: Principal;
  let barrier: Barrier | undefined;
  /** Holds each side after its look at the other's table until both have looked: a side refused first removes its row at once, which the other's look, still queued for a connection, would then miss. */
  let looked: Barrier | undefined;
  let sync: IdempotencyService;
  let jobs: JobsService;
  let keys = 0;
  const claims: IdempotencyClaim[] = [];

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'idempotency-doors');
    principal = opened.principal;
    const dataSource = opened.db.dataSource;
    const meet = () => barrier?.meet() ?? Promise.resolve();
    const bothLooked = () => looked?.meet() ?? Promise.resolve();
    class MeetingIdempotencyRepository extends IdempotencyRepository {
      override async heldByJob(userId: string, key: string, expiredBefore: Date): Promise<boolean> {
        await meet();
        const held = await super.heldByJob(userId, key, expiredBefore);
        await bothLooked();
        return held;
      }
    }
    class MeetingJobsRepository extends JobsRepository {
      override async heldBySyncCall(userId: string, key: string, expiredBefore: Date): Promise<boolean> {
        await meet();
        const held = await super.heldBySyncCall(userId, key, expiredBefore);
        await bothLooked();
        return held;
      }
    }
    const config = loadConfig({});
    const clock = new ManualClock(Date.now());
    const audit = { recordCompletion: vi.fn() } as unknown as AuditService;
    const logger = { logger: createLogger('silent') } as AppLogger;
    sync = new IdempotencyService(new MeetingIdempotencyRepository(dataSource), config, clock, audit, logger);
    const jobsConfig = { jobs: { callbackSecret: undefined }, databaseRequestTimeoutMs: 5000 } as unknown as AppConfig;
    jobs = new JobsService(new MeetingJobsRepository(dataSource), acceptingQueue, jobsConfig, clock, {} as CallbackPolicy, noSubmitCheck);
  });
  afterAll(async () => {
    // Stops the heartbeats of the claims the tests won.
    for (const claim of claims) await claim.release();
    await opened?.close();
  });

  /** One round: the sync call and the submit with a fresh key, at once. Returns who got the key. */
  async function race(): Promise<{ key: string; syncWon: boolean; asyncWon: boolean }> {
    keys += 1;
    const key = `race-${keys}`;
    const [s, a] = await Promise.allSettled([
      sync.open({ principal, requestId: 'req-sync', door: 'chat', body: { messages: [] } } as unknown as CompletionCall, key, 'hash-sync'),
      jobs.submit(newJobFor(principal, { idempotencyKey: key, bodyHash: 'hash-async' })),
    ]);
    if (s.status === 'fulfilled') {
      const claim = s.value.claim;
      if (claim) claims.push(claim);
    } else {
      expect(s.reason).toMatchObject({ code: 'idempotency_key_reused', status: 422, param: 'idempotency-key' });
    }
    if (a.status === 'rejected') expect(a.reason).toMatchObject({ code: 'idempotency_key_reused', status: 422, param: 'idempotency-key' });
    return { key, syncWon: s.status === 'fulfilled', asyncWon: a.status === 'fulfilled' };
  }

  async function left(key: string): Promise<{ syncRows: number; jobs: number }> {
    const db = opened?.db.dataSource;
    const [rows] = (await db?.query<Array<{ sync_rows: number; jobs: number }>>(
      `SELECT (SELECT count(*)::int FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2) AS sync_rows,
              (SELECT count(*)::int FROM jobs WHERE user_id = $1 AND idempotency_key = $2) AS jobs`,
      [principal.userId, key],
    )) ?? [{ sync_rows: -1, jobs: -1 }];
    return { syncRows: rows?.sync_rows ?? -1, jobs: rows?.jobs ?? -1 };
  }

  it('refuses both when each wrote its claim before either looked at the other, and leaves the key free', async () => {
    barrier = new Barrier();
    looked = new Barrier();
    try {
      const { key, syncWon, asyncWon } = await race();
      expect({ syncWon, asyncWon }).toEqual({ syncWon: false, asyncWon: false });
      expect(await left(key)).toEqual({ syncRows: 0, jobs: 0 });
    } finally {
      barrier = undefined;
      looked = undefined;
    }
  });

  it('never gives one key to both in free-running races', async () => {
    for (let round = 0; round < 25; round += 1) {
      const { key, syncWon, asyncWon } = await race();
      expect(syncWon && asyncWon).toBe(false);
      expect(await left(key)).toEqual({ syncRows: syncWon ? 1 : 0, jobs: asyncWon ? 1 : 0 });
    }
  });
});
