import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { REDIS_URL } from '../support/databases.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, type Tenant } from '../support/gateway.js';
import { uniqueRedisPrefix } from '../support/redis.js';

/**
 * PostgreSQL holds its connections without answering (frozen, partitioned, failing over): "a
 * database that stops answering must not hold requests for as long as it is stuck"
 * (DATABASE_REQUEST_TIMEOUT_MS, src/config/config.ts). Every /v1 request a client makes (a sync
 * completion, an async submit, a job poll, its usage) is answered 503 `unavailable` within that
 * bound, not after the pool's own query timeout (statement_timeout + 5 s = 35 s).
 *
 * The instance under test reaches its database through a TCP relay the test freezes; the
 * machine's PostgreSQL is never touched.
 */
const REQUEST_TIMEOUT_MS = 1000;
/** DATABASE_REQUEST_TIMEOUT_MS + slack for a loaded machine: a liveness bound. */
const ANSWER_WITHIN_MS = REQUEST_TIMEOUT_MS + 2000;
/** The test's own patience: well past the bound, well short of the pool's 35 s. */
const CLIENT_GIVES_UP_MS = 12_000;

interface Timed {
  status: number | 'no answer';
  ms: number;
  body: string;
}

describe('client requests while PostgreSQL does not answer (key still cached)', () => {
  let p: ProxiedGateway;
  let alice: Tenant;
  let api: ApiClient;
  let jobId: string;

  beforeAll(async () => {
    p = await startGatewayBehindPostgresProxy({
      env: {
        REDIS_URL,
        REDIS_KEY_PREFIX: uniqueRedisPrefix('database-frozen-deadlines'),
        KEY_CACHE_MS: '2000',
        DATABASE_REQUEST_TIMEOUT_MS: String(REQUEST_TIMEOUT_MS),
        // Every sync call reserves with its own statement (no lease to draw on while the database is away).
        BUDGET_LEASE_MS: '0',
      },
    });
    alice = await p.owner.tenants.create({ userBudgetUsd: 10 });
    api = new ApiClient(p.gw.url, alice.key);
    const job = await api.post<{ id: string }>('/v1/chat/completions', chat('a job'), { prefer: 'respond-async' });
    expect(job.status).toBe(202);
    jobId = job.body.id;
    await pollUntil(async () => expect((await api.get<{ status: string }>(`/v1/jobs/${jobId}`)).body.status).toBe('completed'), 15_000);
  });
  afterAll(async () => {
    await p?.close();
  });
  beforeEach(async () => {
    p.proxy.thaw();
    await pollUntil(async () => expect((await p.gw.admin.get('/health/ready')).status).toBe(200), 60_000, 200);
  });

  /** A request right after a warm-up one (its key is in the 2 s key cache), sent once the database froze. */
  async function duringFreeze(
    warm: () => Promise<unknown>,
    path: string,
    init: { method: string; body?: unknown; headers?: Record<string, string> },
    afterFreeze: () => Promise<unknown> = () => Promise.resolve(),
  ): Promise<Timed> {
    await warm();
    p.proxy.freeze();
    await afterFreeze();
    const started = Date.now();
    try {
      const res = await fetch(`${p.gw.url}${path}`, {
        method: init.method,
        headers: { authorization: `Bearer ${alice.key}`, ...(init.body ? { 'content-type': 'application/json' } : {}), ...init.headers },
        body: init.body ? JSON.stringify(init.body) : undefined,
        signal: AbortSignal.timeout(CLIENT_GIVES_UP_MS),
      });
      return { status: res.status, ms: Date.now() - started, body: (await res.text()).slice(0, 300) };
    } catch {
      return { status: 'no answer', ms: Date.now() - started, body: '' };
    } finally {
      p.proxy.thaw();
    }
  }

  function expectUnavailableInTime(r: Timed): void {
    expect(r.ms, JSON.stringify(r)).toBeLessThan(ANSWER_WITHIN_MS);
    expect(r.status, JSON.stringify(r)).toBe(503);
    expect(r.body, JSON.stringify(r)).toContain('database unavailable');
  }

  it('control: a sync completion is answered 503 unavailable within DATABASE_REQUEST_TIMEOUT_MS', async () => {
    const r = await duringFreeze(() => api.get('/v1/models'), '/v1/chat/completions', { method: 'POST', body: chat('sync while frozen') });
    expectUnavailableInTime(r);
  });

  it('answers a job poll (GET /v1/jobs/{id}) 503 within DATABASE_REQUEST_TIMEOUT_MS', async () => {
    expectUnavailableInTime(await duringFreeze(() => api.get('/v1/models'), `/v1/jobs/${jobId}`, { method: 'GET' }));
    // And the poll works again once the database answers.
    expect((await api.get<{ status: string }>(`/v1/jobs/${jobId}`)).body.status).toBe('completed');
  });

  it('answers an async submit 503 within DATABASE_REQUEST_TIMEOUT_MS (the budget check)', async () => {
    const r = await duringFreeze(() => api.get('/v1/models'), '/v1/chat/completions', {
      method: 'POST',
      body: chat('async while frozen'),
      headers: { prefer: 'respond-async' },
    });
    expectUnavailableInTime(r);
  });

  it('answers an async submit 503 within DATABASE_REQUEST_TIMEOUT_MS right after a sync call of the same user (its settle waits in the writer)', async () => {
    // A sync call that is past its reservation when the database stops answering: its settle can
    // only wait in the budget writer. An async submit of the same user then asks the budget
    // (SubmitCheck → BudgetService.assertAffordable), which first stores that settle: bounded.
    p.gw.stub.configure({ latencyMs: 600 });
    try {
      const hits = p.gw.stub.hits;
      const pending = api.post('/v1/chat/completions', chat(`answered while frozen ${randomUUID()}`));
      await pollUntil(() => expect(p.gw.stub.hits).toBeGreaterThan(hits));
      const r = await duringFreeze(
        () => Promise.resolve(),
        '/v1/chat/completions',
        { method: 'POST', body: chat('async while frozen'), headers: { prefer: 'respond-async' } },
        async () => {
          expect((await pending).status).toBe(200);
        },
      );
      expectUnavailableInTime(r);
    } finally {
      p.gw.stub.configure({ latencyMs: 0 });
    }
  });

  it('answers a keyed async submit 503 within DATABASE_REQUEST_TIMEOUT_MS (the insert), and its record does not outlive the 503', async () => {
    const key = `frozen-${randomUUID()}`;
    const body = chat('keyed async while frozen');
    const r = await duringFreeze(() => api.get('/v1/models'), '/v1/chat/completions', {
      method: 'POST',
      body,
      headers: { prefer: 'respond-async', 'idempotency-key': key },
    });
    expectUnavailableInTime(r);
    // The insert the relay held back lands once the database answers; the submit that gave up on it
    // removes it again, so a retry gets a new job at once (not 409 until the record is taken over
    // a minute later, nor a job its submitter was told was not accepted).
    let retried = '';
    await pollUntil(
      async () => {
        const retry = await api.post<{ id: string }>('/v1/chat/completions', body, { prefer: 'respond-async', 'idempotency-key': key });
        expect(retry.status, JSON.stringify(retry.body)).toBe(202);
        expect(retry.headers.get('idempotent-replayed')).toBeNull();
        retried = retry.body.id;
      },
      10_000,
      200,
    );
    // Its run is over before the next test counts upstream calls.
    await pollUntil(async () => expect((await api.get<{ status: string }>(`/v1/jobs/${retried}`)).body.status).toBe('completed'), 15_000);
  });

  it('answers GET /v1/usage 503 within DATABASE_REQUEST_TIMEOUT_MS', async () => {
    expectUnavailableInTime(await duringFreeze(() => api.get('/v1/models'), '/v1/usage', { method: 'GET' }));
    expect((await api.get('/v1/usage')).status).toBe(200);
  });

  it('answers GET /v1/usage 503 within DATABASE_REQUEST_TIMEOUT_MS when its own settles wait in the writer', async () => {
    p.gw.stub.configure({ latencyMs: 600 });
    try {
      const hits = p.gw.stub.hits;
      const pending = api.post('/v1/chat/completions', chat(`settled while frozen ${randomUUID()}`));
      await pollUntil(() => expect(p.gw.stub.hits).toBeGreaterThan(hits));
      const r = await duringFreeze(
        () => Promise.resolve(),
        '/v1/usage',
        { method: 'GET' },
        async () => {
          expect((await pending).status).toBe(200);
        },
      );
      expectUnavailableInTime(r);
    } finally {
      p.gw.stub.configure({ latencyMs: 0 });
    }
  });
});

function chat(content: string) {
  return { model: 'auto', messages: [{ role: 'user', content }] };
}
