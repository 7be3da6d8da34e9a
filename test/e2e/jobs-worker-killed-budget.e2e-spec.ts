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

// A worker SIGKILLed mid-try leaves its try's budget reservation behind (the sweeper frees it only
// after BUDGET_RESERVATION_TTL_MS, 10 min). Another worker takes the job over once the dead run's
// heartbeat is stale (30 s), and its try reserves the worst case again: with the dead try's hold
// still counted, a user whose budget covers the job once (not twice) had the job failed for good
// with 402 budget_exceeded, not even dead-lettered, having spent nothing.

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
  };
  let api: TestGateway;
  let survivor: WorkerProcess | undefined;
  let doomed: ChildProcess | undefined;
  let alice: Tenant;
  let worst: bigint;

  beforeAll(async () => {
    api = await startTestGateway({ db: 'postgres', env: { ...env, GATEHOUSE_ROLE: 'api' } });
    worst = worstCaseNanos(api, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
    // Room for this job one and a half times over: enough for it, not for it twice.
    alice = await api.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'total' });
  });
  afterAll(async () => {
    doomed?.kill('SIGKILL');
    await survivor?.close();
    await api?.close();
    await dropRedisKeys(env.REDIS_KEY_PREFIX as string);
  });

  it('the job a surviving worker takes over completes; the dead try does not leave its budget held against it', { timeout: 180_000 }, async () => {
    // The first try hangs at the upstream until its worker is killed.
    api.stub.configure({ latencyMs: 120_000 });
    const submit = await alice.api.post<JobBody>('/v1/chat/completions', REQUEST, { ...ASYNC, ...FRESH });
    expect(submit.status).toBe(202);
    const id = submit.body.id;

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
        expect(api.stub.hits).toBe(1);
        expect((await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body.status).toBe('running');
      },
      60_000,
      100,
    );
    doomed.kill('SIGKILL');
    await new Promise((resolve) => doomed?.once('exit', resolve));
    doomed = undefined;

    // The upstream is healthy again; another worker takes the job over once the dead run is stale.
    api.stub.configure({});
    survivor = await startWorker(api, env);
    const job = await pollUntil(
      async () => {
        const res = await alice.api.get<JobBody>(`/v1/jobs/${id}`);
        expect(['completed', 'failed']).toContain(res.body.status);
        return res.body;
      },
      150_000,
      250,
    );
    const [held] = await dataSourceOf(api).query<Array<{ n: string }>>(`SELECT count(*) AS n FROM budget_reservations WHERE request_id LIKE $1`, [`job-${id}-%`]);
    expect({ status: job.status, dead_lettered: job.dead_lettered, error: job.error?.code ?? null, heldByDeadTries: Number(held?.n) }).toEqual({
      status: 'completed',
      dead_lettered: false,
      error: null,
      heldByDeadTries: 0,
    });
  });
});
