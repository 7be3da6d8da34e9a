import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { CONFIG_VARIABLES, type Env } from '../../src/config/config.js';
import type { WorkerProcess } from '../../src/gateway.js';
import { dataSourceOf, MAX_TOKENS, MODEL, REQUEST, worstCaseNanos } from '../integration/budget-support.js';
import { BUNDLE } from '../support/bundle.js';
import { REDIS_URL } from '../support/databases.js';
import { pollUntil, startTestGateway, startWorker, type Tenant, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, uniqueRedisPrefix } from '../support/redis.js';

// A worker SIGKILLed mid-try leaves its try's budget hold behind, until the sweeper releases it
// (BUDGET_RESERVATION_TTL_MS after its last renewal). Another worker takes the job over once the
// dead run's heartbeat is stale (30 s), and its try reserves the worst case again. With the dead
// try's hold still counted, a user whose budget covers the job once (not twice) had the job failed
// for good with 402 budget_exceeded, not even dead-lettered, having spent nothing; one whose dead
// try had drawn on a lease (room for 32 worst cases) was refused by that lease's hold the same way.
// The takeover must wait for the dead hold's release and then complete, never free it early (a
// worker only cut off from the database may still be running its try).

const ASYNC = { prefer: 'respond-async' };
const FRESH = { 'cache-control': 'no-cache, no-store' };
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

interface JobBody {
  id: string;
  status: string;
  attempts: number;
  dead_lettered: boolean;
  error: { code: string; param: string | null } | null;
}

describe('a BullMQ worker process killed (SIGKILL) in the middle of a job', () => {
  const env: Env = {
    ...NO_RATE_LIMITS,
    REDIS_URL,
    REDIS_KEY_PREFIX: uniqueRedisPrefix('jobs-kill'),
    UPSTREAM_RETRY_ATTEMPTS: '1',
    // A dead hold is swept 30 s after its last renewal (the TTL must exceed the deadline and the
    // lease), and a try refused on it asks again every second.
    UPSTREAM_TIMEOUT_MS: '20000',
    UPSTREAM_DEADLINE_MS: '20000',
    BUDGET_RESERVATION_TTL_MS: '30000',
    BUDGET_SWEEP_INTERVAL_MS: '500',
    JOBS_BACKOFF_MAX_MS: '1000',
  };
  let api: TestGateway;
  let survivor: WorkerProcess | undefined;
  let doomed: ChildProcess | undefined;
  /** Room for the job 1.5 times over (its try holds exactly), and 32.5 times (room for a lease of 32). */
  let tight: Tenant;
  let roomy: Tenant;
  let worst: bigint;

  beforeAll(async () => {
    api = await startTestGateway({ db: 'postgres', env: { ...env, GATEHOUSE_ROLE: 'api' } });
    worst = worstCaseNanos(api, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
    tight = await api.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'total' });
    roomy = await api.tenants.create({ userBudgetUsd: formatUsd((worst * 65n) / 2n), period: 'total' });
  });
  afterAll(async () => {
    doomed?.kill('SIGKILL');
    await survivor?.close();
    await api?.close();
    await dropRedisKeys(env.REDIS_KEY_PREFIX as string);
  });

  it('the jobs a surviving worker takes over complete once the dead tries\' holds are released', { timeout: 240_000 }, async () => {
    // The first tries hang at the upstream until their worker is killed.
    api.stub.configure({ latencyMs: 120_000 });
    const ids: Record<string, string> = {};
    for (const [name, tenant] of [['tight', tight], ['roomy', roomy]] as const) {
      const submit = await tenant.api.post<JobBody>('/v1/chat/completions', REQUEST, { ...ASYNC, ...FRESH });
      expect(submit.status).toBe(202);
      ids[name] = submit.body.id;
    }

    // A real worker process (the shipped bundle, GATEHOUSE_ROLE=worker) on the same PostgreSQL and Redis.
    // Only its death matters here (what it leaves behind); the surviving worker below runs src/.
    expect(existsSync(BUNDLE), 'dist/bundle/main.js is missing: run `npm run build`').toBe(true);
    const childEnv: NodeJS.ProcessEnv = { ...process.env };
    for (const name of Object.keys(CONFIG_VARIABLES)) delete childEnv[name];
    Object.assign(childEnv, {
      ...env,
      GATEHOUSE_ROLE: 'worker',
      LOG_LEVEL: 'silent',
      DATABASE_URL: api.database.url,
      ADMIN_API_KEY: api.adminKey,
      OPENROUTER_API_KEY: 'sk-test-upstream-secret',
      OPENROUTER_BASE_URL: api.stub.url,
    });
    doomed = spawn(process.execPath, [BUNDLE], { env: childEnv, stdio: 'ignore' });
    await pollUntil(
      async () => {
        expect(api.stub.hits).toBe(2);
        expect((await tight.api.get<JobBody>(`/v1/jobs/${ids.tight}`)).body.status).toBe('running');
        expect((await roomy.api.get<JobBody>(`/v1/jobs/${ids.roomy}`)).body.status).toBe('running');
      },
      60_000,
      100,
    );
    doomed.kill('SIGKILL');
    await new Promise((resolve) => doomed?.once('exit', resolve));
    doomed = undefined;

    // The upstream is healthy again; another worker takes the jobs over once the dead run is stale.
    api.stub.configure({});
    survivor = await startWorker(api, env);
    const outcome = async (tenant: Tenant, id: string) => {
      const job = await pollUntil(
        async () => {
          const res = await tenant.api.get<JobBody>(`/v1/jobs/${id}`);
          expect(['completed', 'failed']).toContain(res.body.status);
          return res.body;
        },
        180_000,
        250,
      );
      return { status: job.status, dead_lettered: job.dead_lettered, error: job.error?.code ?? null };
    };
    const done = { status: 'completed', dead_lettered: false, error: null };
    expect({ tight: await outcome(tight, ids.tight), roomy: await outcome(roomy, ids.roomy) }).toEqual({ tight: done, roomy: done });
    // Each charged once (its completed try), and nothing held any more.
    const ds = dataSourceOf(api);
    const held = await ds.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM budget_reservations WHERE user_id = ANY($1::uuid[])`, [[tight.userId, roomy.userId]]);
    expect(Number(held[0]?.n)).toBe(0);
    const charged = await ds.query<Array<{ request_id: string }>>(`SELECT request_id FROM usage_ledger WHERE user_id = ANY($1::uuid[]) ORDER BY request_id`, [
      [tight.userId, roomy.userId],
    ]);
    expect(charged.map((r) => r.request_id).sort()).toEqual([`job-${ids.tight}-2`, `job-${ids.roomy}-2`].sort());
  });
});
