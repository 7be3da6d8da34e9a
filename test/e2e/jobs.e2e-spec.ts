import { createHmac } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startStubUpstream } from '../../libs/stub-upstream/src/index.js';
import { createPostgresDatabase } from '../support/databases.js';
import { ApiClient, type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface JobBody {
  id: string;
  object: string;
  status: 'queued' | 'running' | 'completed' | 'failed';
  result: { object: string; model: string; choices: Array<{ message: { content: string } }> } | null;
  error: { code: string; type: string; message: string } | null;
  attempts: number;
  dead_lettered: boolean;
  created_at: string;
  completed_at: string | null;
  cost_usd: number | null;
}

const ASYNC = { prefer: 'respond-async' };
// Polling GET /v1/jobs counts against rate limits like any /v1 call; these tests are not about them.
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };
const CALLBACK_SECRET = 'test-callback-secret-0123456789';
const chat = (content: string, extra: Record<string, unknown> = {}) => ({ model: 'auto', messages: [{ role: 'user', content }], ...extra });

/** Polls GET /v1/jobs/{id} until the job is finished (completed or failed). */
async function finished(client: ApiClient, id: string): Promise<JobBody> {
  return pollUntil(
    async () => {
      const res = await client.get<JobBody>(`/v1/jobs/${id}`);
      expect(res.status).toBe(200);
      expect(['completed', 'failed']).toContain(res.body.status);
      return res.body;
    },
    20_000,
    50,
  );
}

function expectAccepted(res: HttpResult<JobBody>): string {
  expect(res.status).toBe(202);
  expect(res.body).toMatchObject({ object: 'gateway.job', status: 'queued' });
  expect(res.headers.get('location')).toBe(`/v1/jobs/${res.body.id}`);
  return res.body.id;
}

interface Delivery {
  headers: IncomingHttpHeaders;
  body: string;
}

/** A callback receiver on loopback that records what it is sent. */
async function startReceiver(): Promise<{ url: string; deliveries: Delivery[]; close(): Promise<void> }> {
  const deliveries: Delivery[] = [];
  const server: Server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      deliveries.push({ headers: req.headers, body });
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}/hooks/gatehouse?token=abc`, deliveries, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

describe('async jobs on the embedded default (inline queue, PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  let bob: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({
      env: {
        ...NO_RATE_LIMITS,
        // One upstream try per job try, so job attempts count upstream failures one to one.
        UPSTREAM_RETRY_ATTEMPTS: '1',
        JOBS_MAX_ATTEMPTS: '3',
        JOBS_BACKOFF_MS: '20',
        JOBS_BACKOFF_MAX_MS: '100',
        JOBS_CALLBACK_SECRET: CALLBACK_SECRET,
        // The test receiver listens on loopback, which callbacks may reach only when listed.
        JOBS_CALLBACK_ALLOWED_HOSTS: '127.0.0.1/32',
      },
    });
    alice = await gw.tenants.create();
    bob = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('answers prefer: respond-async with 202 and a location, and the job ends with the chat completion', async () => {
    const submit = await alice.api.post<JobBody>('/v1/chat/completions', chat('async hello', { task_type: 'code' }), ASYNC);
    const id = expectAccepted(submit);
    expect(submit.headers.get('preference-applied')).toBe('respond-async');
    const job = await finished(alice.api, id);
    expect(job).toMatchObject({ id, object: 'gateway.job', status: 'completed', error: null, attempts: 1, dead_lettered: false });
    expect(job.result).toMatchObject({ object: 'chat.completion', model: 'anthropic/claude-3.5-sonnet' });
    expect(job.result?.choices[0]?.message.content).toBe('Mock reply to: async hello');
    expect(Date.parse(job.completed_at ?? '')).toBeGreaterThanOrEqual(Date.parse(job.created_at));
    expect(typeof job.cost_usd).toBe('number');
    // It went through the same pipeline: routed by task_type, capped, gateway fields stripped.
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ model: 'anthropic/claude-3.5-sonnet', max_tokens: 1024 });
    expect(gw.stub.requests.at(-1)?.body).not.toHaveProperty('task_type');
  });

  it('accepts prefer: respond-async on /v1/complete too (the result is the chat completion)', async () => {
    const id = expectAccepted(
      await alice.api.post<JobBody>('/v1/complete', { prompt: 'simple async', max_tokens: 20 }, { prefer: 'return=minimal, respond-async' }),
    );
    const job = await finished(alice.api, id);
    expect(job.status).toBe('completed');
    expect(job.result?.choices[0]?.message.content).toBe('Mock reply to: simple async');
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ max_tokens: 20 });
  });

  it('returns the same job for a retried submit with the same idempotency-key, and 422 for the same key with another body', async () => {
    const headers = { ...ASYNC, 'idempotency-key': 'order-42' };
    const first = await alice.api.post<JobBody>('/v1/chat/completions', chat('idempotent'), headers);
    const id = expectAccepted(first);
    const again = await alice.api.post<JobBody>('/v1/chat/completions', chat('idempotent'), headers);
    expect(again.status).toBe(202);
    expect(again.body.id).toBe(id);
    expect(again.headers.get('location')).toBe(`/v1/jobs/${id}`);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    await finished(alice.api, id);
    expect(gw.stub.hits).toBe(1);

    const reused = await alice.api.post('/v1/chat/completions', chat('a different question'), headers);
    expect(reused).toMatchObject({ status: 422, body: { error: { type: 'invalid_request_error', code: 'idempotency_key_reused', param: 'idempotency-key' } } });
    // Keys are per user: bob's 'order-42' is his own job.
    const bobs = await bob.api.post<JobBody>('/v1/chat/completions', chat('a different question'), headers);
    expect(expectAccepted(bobs)).not.toBe(id);
  });

  it('lets only the submitter or an admin read a job; others get 404', async () => {
    const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('private'), ASYNC));
    await finished(alice.api, id);
    expect(await bob.api.get(`/v1/jobs/${id}`)).toMatchObject({ status: 404, body: { error: { type: 'not_found_error', code: 'not_found' } } });
    expect((await gw.admin.get<JobBody>(`/v1/jobs/${id}`)).body.status).toBe('completed');
    expect((await alice.api.get('/v1/jobs/00000000-0000-4000-8000-000000000000')).status).toBe(404);
    expect((await alice.api.get('/v1/jobs/not-a-job')).status).toBe(404);
    expect((await gw.admin.request('GET', `/v1/jobs/${id}`, undefined, { authorization: '' })).status).toBe(401);
  });

  it('refuses stream: true with respond-async, and malformed idempotency keys or callback URLs, naming the field', async () => {
    const stream = await alice.api.post('/v1/chat/completions', chat('x', { stream: true }), ASYNC);
    expect(stream).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'stream' } } });
    const key = await alice.api.post('/v1/chat/completions', chat('x'), { ...ASYNC, 'idempotency-key': 'has spaces in it' });
    expect(key).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'idempotency-key' } } });
    const callback = await alice.api.post('/v1/chat/completions', chat('x', { callback_url: 'ftp://example.test/x' }), ASYNC);
    expect(callback).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'callback_url' } } });
    const invalid = await alice.api.post('/v1/chat/completions', { model: 'auto' }, ASYNC);
    expect(invalid).toMatchObject({ status: 400, body: { error: { code: 'missing_field', param: 'messages' } } });
    expect(gw.stub.hits).toBe(0);
  });

  it('retries transient upstream failures with backoff: 503 on the first two tries, then OK → completed after 3 attempts', async () => {
    gw.stub.configure({ status: 503, failTimes: 2 });
    const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('flaky upstream'), ASYNC));
    const job = await finished(alice.api, id);
    expect(job).toMatchObject({ status: 'completed', attempts: 3, dead_lettered: false, error: null });
    expect(job.result?.choices[0]?.message.content).toBe('Mock reply to: flaky upstream');
    expect(gw.stub.hits).toBe(3);
  });

  it('dead-letters a job that fails every try; an admin sees it, retries it after the upstream recovers, and it completes', async () => {
    gw.stub.configure({ status: 500 });
    const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('doomed at first'), ASYNC));
    const dead = await finished(alice.api, id);
    expect(dead).toMatchObject({ status: 'failed', attempts: 3, dead_lettered: true, result: null, error: { type: 'upstream_error', code: 'upstream_error' } });
    expect(gw.stub.hits).toBe(3);

    const list = await gw.admin.get<{ object: string; data: Array<{ id: string; user_id: string; door: string; error: { code: string } }> }>(
      '/admin/queue/dead',
    );
    expect(list.status).toBe(200);
    expect(list.body.data.find((j) => j.id === id)).toMatchObject({ user_id: alice.userId, door: 'chat', error: { code: 'upstream_error' } });
    expect((await alice.api.get('/admin/queue/dead')).status).toBe(403);

    gw.stub.reset();
    const retry = await gw.admin.post<JobBody>(`/admin/queue/dead/${id}/retry`);
    expect(retry.status).toBe(202);
    expect(retry.body).toMatchObject({ id, status: 'queued', attempts: 0, dead_lettered: false });
    const done = await finished(alice.api, id);
    expect(done).toMatchObject({ status: 'completed', attempts: 1, dead_lettered: false, error: null });
    expect(done.result?.choices[0]?.message.content).toBe('Mock reply to: doomed at first');
    expect((await gw.admin.get<{ data: Array<{ id: string }> }>('/admin/queue/dead')).body.data.map((j) => j.id)).not.toContain(id);
    expect((await gw.admin.post(`/admin/queue/dead/${id}/retry`)).status).toBe(404);
  });

  it('fails a job at once, without retry or dead-lettering, when the failure is the request’s own (4xx)', async () => {
    gw.stub.configure({ status: 400 });
    const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('bad request upstream'), ASYNC));
    const job = await finished(alice.api, id);
    // The upstream's own code (the stub's for a 400) is relayed, as on the sync door.
    expect(job).toMatchObject({ status: 'failed', attempts: 1, dead_lettered: false, error: { type: 'invalid_request_error', code: 'invalid_request' } });
    expect(gw.stub.hits).toBe(1);
  });

  it('refuses a submit with 402 budget_exceeded when its user has no budget left, as a sync call (test/e2e/jobs-budget.e2e-spec.ts)', async () => {
    const broke = await gw.tenants.create({ userBudgetUsd: 0 });
    const refused = await broke.api.post('/v1/chat/completions', chat('no money'), ASYNC);
    expect(refused).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', type: 'insufficient_quota', param: 'user' } } });
    expect(gw.stub.hits).toBe(0);
  });

  it('removes a job from the dead-letter queue on DELETE; its submitter still reads it as failed', async () => {
    gw.stub.configure({ status: 502 });
    const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('to be discarded'), ASYNC));
    expect((await finished(alice.api, id)).dead_lettered).toBe(true);
    const removed = await gw.admin.delete(`/admin/queue/dead/${id}`);
    expect(removed).toMatchObject({ status: 200, body: { id, object: 'gateway.job', deleted: true } });
    expect((await gw.admin.delete(`/admin/queue/dead/${id}`)).status).toBe(404);
    expect((await gw.admin.get<{ data: Array<{ id: string }> }>('/admin/queue/dead')).body.data.map((j) => j.id)).not.toContain(id);
    expect((await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body).toMatchObject({ status: 'failed', dead_lettered: false, error: { code: 'upstream_error' } });
  });

  it('drops no accepted job: a burst while the upstream fails then recovers ends completed or dead-lettered, and dead ones complete on retry', async () => {
    gw.stub.configure({ status: 503, failTimes: 8 });
    const ids = await Promise.all(
      Array.from({ length: 12 }, async (_, i) => expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat(`burst ${i}`), ASYNC))),
    );
    const outcomes = await Promise.all(ids.map((id) => finished(alice.api, id)));
    for (const job of outcomes) {
      expect(job.status === 'completed' || (job.status === 'failed' && job.dead_lettered)).toBe(true);
      expect(job.attempts).toBeGreaterThanOrEqual(1);
      expect(job.attempts).toBeLessThanOrEqual(3);
    }
    // Every failed try was one of the stub's 8 failures; every job got its answer or its 3 tries.
    expect(outcomes.reduce((n, j) => n + j.attempts, 0)).toBe(gw.stub.hits);
    const dead = outcomes.filter((j) => j.dead_lettered);
    for (const job of dead) expect((await gw.admin.post(`/admin/queue/dead/${job.id}/retry`)).status).toBe(202);
    const final = await Promise.all(ids.map((id) => finished(alice.api, id)));
    expect(final.map((j) => j.status)).toEqual(Array(12).fill('completed'));
    expect(final.map((j) => j.result?.choices[0]?.message.content).sort()).toEqual(ids.map((_, i) => `Mock reply to: burst ${i}`).sort());
  });

  it('counts jobs by state at GET /admin/queue, and reports the queue in readiness', async () => {
    const stats = await gw.admin.get<{ object: string; driver: string; processing: boolean; counts: Record<string, number>; broker: Record<string, number> }>(
      '/admin/queue',
    );
    expect(stats.status).toBe(200);
    expect(stats.body).toMatchObject({ object: 'gateway.queue', driver: 'inline', processing: true, broker: { waiting: 0, active: 0, delayed: 0 } });
    expect(stats.body.counts.completed).toBeGreaterThanOrEqual(4);
    expect(stats.body.counts.failed).toBeGreaterThanOrEqual(stats.body.counts.dead_lettered ?? 0);
    expect(stats.body.counts).toMatchObject({ queued: 0, running: 0 });
    const ready = await gw.admin.get<{ status: string; details: Record<string, { status: string; driver?: string }> }>('/health/ready');
    expect(ready.body.details.queue).toMatchObject({ status: 'up', driver: 'inline' });
  });

  it('POSTs the finished job to callback_url, signed with HMAC-SHA256 of "<t>.<exact body>"', async () => {
    const receiver = await startReceiver();
    try {
      const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('call me back', { callback_url: receiver.url }), ASYNC));
      await finished(alice.api, id);
      const delivery = await pollUntil(() => {
        expect(receiver.deliveries).toHaveLength(1);
        return receiver.deliveries[0];
      });
      const t = String(delivery.headers['x-gatehouse-timestamp']);
      const expected = `t=${t},v1=${createHmac('sha256', CALLBACK_SECRET).update(`${t}.${delivery.body}`).digest('hex')}`;
      expect(delivery.headers['x-gatehouse-signature']).toBe(expected);
      expect(Math.abs(Date.now() / 1000 - Number(t))).toBeLessThan(300);
      expect(delivery.headers['content-type']).toBe('application/json');
      expect(JSON.parse(delivery.body)).toMatchObject({ id, object: 'gateway.job', status: 'completed' });
      // The upstream never sees the gateway's own field.
      expect(gw.stub.requests.at(-1)?.body).not.toHaveProperty('callback_url');
    } finally {
      await receiver.close();
    }
  });

  it('calls back a dead-lettered job as failed, and again once an admin retry completes it; a /v1/complete job too', async () => {
    const receiver = await startReceiver();
    try {
      gw.stub.configure({ status: 503 });
      const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('dead, then retried', { callback_url: receiver.url }), ASYNC));
      const dead = await pollUntil(() => {
        expect(receiver.deliveries).toHaveLength(1);
        return JSON.parse(receiver.deliveries[0]?.body ?? '') as JobBody;
      });
      expect(dead).toMatchObject({ id, status: 'failed', dead_lettered: true, attempts: 3, error: { code: 'upstream_error' } });
      gw.stub.reset();
      expect((await gw.admin.post(`/admin/queue/dead/${id}/retry`)).status).toBe(202);
      const retried = await pollUntil(() => {
        expect(receiver.deliveries).toHaveLength(2);
        return JSON.parse(receiver.deliveries[1]?.body ?? '') as JobBody;
      });
      expect(retried).toMatchObject({ id, status: 'completed', dead_lettered: false, attempts: 1 });

      const complete = expectAccepted(await alice.api.post<JobBody>('/v1/complete', { prompt: 'call me back', callback_url: receiver.url }, ASYNC));
      const delivered = await pollUntil(() => {
        expect(receiver.deliveries).toHaveLength(3);
        return JSON.parse(receiver.deliveries[2]?.body ?? '') as JobBody;
      });
      expect(delivered).toMatchObject({ id: complete, status: 'completed' });
    } finally {
      await receiver.close();
    }
  });

  it('with JOBS_CALLBACK_ALLOWED_HOSTS set, refuses callback hosts it does not list (also public ones and localhost)', async () => {
    for (const url of ['https://hooks.example.com/x?token=abc', 'http://localhost:9/x', 'http://127.0.0.2:9/x']) {
      const res = await alice.api.post<{ error: { message: string } }>('/v1/chat/completions', chat('x', { callback_url: url }), ASYNC);
      expect(res, url).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'callback_url' } } });
      expect(res.body.error.message).toContain("is not in the gateway's JOBS_CALLBACK_ALLOWED_HOSTS");
    }
    expect(gw.stub.hits).toBe(0);
  });
});

describe('callback_url with the default policy (no JOBS_CALLBACK_ALLOWED_HOSTS): public hosts only', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...NO_RATE_LIMITS, JOBS_CALLBACK_SECRET: CALLBACK_SECRET } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('refuses cloud metadata, localhost and loopback in any spelling with 400, saying why without echoing the path', async () => {
    const cases: Array<[string, string]> = [
      ['http://169.254.169.254/latest/meta-data/iam/security-credentials/?token=s3cret', '169.254.169.254 is a link-local address'],
      ['http://localhost:8080/hook?token=s3cret', 'localhost is not a public host name'],
      ['http://[::1]:8080/hook?token=s3cret', '::1 is a loopback address'],
      ['http://[::ffff:127.0.0.1]/hook?token=s3cret', '::ffff:7f00:1 is a loopback address'],
      ['http://2130706433/hook?token=s3cret', '127.0.0.1 is a loopback address'],
      ['http://10.0.0.8/hook?token=s3cret', '10.0.0.8 is a private address'],
    ];
    for (const [url, reason] of cases) {
      const res = await alice.api.post<{ error: { message: string } }>('/v1/chat/completions', chat('x', { callback_url: url }), ASYNC);
      expect(res, url).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value', param: 'callback_url' } } });
      expect(res.body.error.message).toContain(reason);
      expect(res.body.error.message).not.toContain('s3cret');
    }
    // Nothing was queued or sent upstream for them.
    expect(gw.stub.hits).toBe(0);
    expect((await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue')).body.counts).toMatchObject({ queued: 0, running: 0, completed: 0 });
  });
});

describe('async jobs with a tiny queue and no callback secret', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...NO_RATE_LIMITS, JOBS_MAX_QUEUED: '1', JOBS_CONCURRENCY: '1' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('answers 503 queue_full with retry-after while the bound is reached, and accepts again once it drains', async () => {
    // The first job holds the only slot while the upstream takes its time.
    gw.stub.configure({ latencyMs: 1500 });
    const first = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('slow one'), ASYNC));
    const full = await alice.api.post('/v1/chat/completions', chat('one too many'), ASYNC);
    expect(full).toMatchObject({ status: 503, body: { error: { type: 'overloaded_error', code: 'queue_full' } } });
    expect(Number(full.headers.get('retry-after'))).toBeGreaterThan(0);
    // Sync traffic does not queue, so backpressure on jobs never touches it.
    gw.stub.configure({ latencyMs: 0 });
    expect((await alice.api.post('/v1/chat/completions', chat('sync still fine'))).status).toBe(200);
    expect((await finished(alice.api, first)).status).toBe('completed');
    const later = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('after the drain'), ASYNC));
    expect((await finished(alice.api, later)).status).toBe('completed');
    // The refused submit left no record behind.
    const stats = await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue');
    expect(stats.body.counts).toMatchObject({ completed: 2, queued: 0, running: 0, failed: 0 });
  });

  it('refuses callback_url with 400 when no JOBS_CALLBACK_SECRET is configured', async () => {
    const res = await alice.api.post('/v1/chat/completions', chat('x', { callback_url: 'http://127.0.0.1:9/hook' }), ASYNC);
    expect(res).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'callback_url' } } });
  });
});

describe('inline jobs survive a restart (embedded queue, job records in PostgreSQL)', () => {
  /**
   * A first process, on a PostgreSQL database of its own, that accepted `count` jobs and stopped:
   * one slot and a slow upstream, so the first job ran (shutdown lets it finish) and the others
   * waited in the process's memory, lost from there but not from the database. `restart` starts
   * the next process, with the upstream fast again.
   */
  async function stoppedWith(count: number, label: string) {
    const database = await createPostgresDatabase();
    const stub = await startStubUpstream();
    const env = { ...NO_RATE_LIMITS, JOBS_CONCURRENCY: '1' };
    let next: TestGateway | undefined;
    const close = async (): Promise<void> => {
      await next?.close();
      await stub.close();
      await database.drop();
    };
    try {
      const first = await startTestGateway({ db: 'postgres', postgresUrl: database.url, stub, env });
      const ids: string[] = [];
      let aliceKey: string;
      try {
        const alice = await first.tenants.create();
        aliceKey = alice.key;
        stub.configure({ latencyMs: 1000 });
        for (let i = 0; i < count; i += 1) ids.push(expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat(`${label} ${i}`), ASYNC)));
      } finally {
        await first.close();
      }
      return {
        database,
        ids,
        async restart(): Promise<ApiClient> {
          stub.configure({});
          next = await startTestGateway({ db: 'postgres', postgresUrl: database.url, stub, env });
          return new ApiClient(next.url, aliceKey);
        },
        close,
      };
    } catch (error) {
      await close();
      throw error;
    }
  }

  async function query<T extends pg.QueryResultRow>(url: string, sql: string, params: unknown[] = []): Promise<pg.QueryResult<T>> {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      return await client.query<T>(sql, params);
    } finally {
      await client.end();
    }
  }

  it('requeues at start the jobs that were still queued when the previous process stopped, and runs them', async () => {
    const stopped = await stoppedWith(4, 'restart');
    try {
      const { rows } = await query<{ status: string; n: string }>(
        stopped.database.url,
        `SELECT status, count(*) AS n FROM jobs GROUP BY status ORDER BY status`,
      );
      expect(rows.map((r) => [r.status, Number(r.n)])).toEqual([
        ['completed', 1],
        ['queued', 3],
      ]);

      const aliceOnSecond = await stopped.restart();
      const jobs = await Promise.all(stopped.ids.map((id) => finished(aliceOnSecond, id)));
      expect(jobs.map((j) => j.status)).toEqual(['completed', 'completed', 'completed', 'completed']);
      expect(jobs.map((j) => j.result?.choices[0]?.message.content)).toEqual(stopped.ids.map((_, i) => `Mock reply to: restart ${i}`));
    } finally {
      await stopped.close();
    }
  });

  it('runs, once its heartbeat is stale, a job the previous process left running when it died', async () => {
    const stopped = await stoppedWith(2, 'crash');
    try {
      // What a crash mid-try leaves: the waiting job's row says running, touched a moment ago (its heartbeat).
      const { rowCount } = await query(
        stopped.database.url,
        `UPDATE jobs SET status = 'running', attempts = 1, started_at = now(), updated_at = now() WHERE id = $1 AND status = 'queued'`,
        [stopped.ids[1]],
      );
      expect(rowCount).toBe(1);

      const aliceOnSecond = await stopped.restart();
      // Not at once: on PostgreSQL the start cannot tell a dead run from another instance's live one
      // (next test). The start-up sweep's delivery asks again once a dead run's heartbeat is stale
      // (30 s), well before the periodic sweep (5 minutes).
      const job = await pollUntil(
        async () => {
          const res = await aliceOnSecond.get<JobBody>(`/v1/jobs/${stopped.ids[1] ?? ''}`);
          expect(res.body.status).toBe('completed');
          return res.body;
        },
        45_000,
        200,
      );
      expect(job).toMatchObject({ status: 'completed', attempts: 2 });
      expect(job.result?.choices[0]?.message.content).toBe('Mock reply to: crash 1');
    } finally {
      await stopped.close();
    }
  });

  it('leaves a job another instance is running to that instance (a rolling deploy starts the new pod first): run and charged once', async () => {
    const database = await createPostgresDatabase();
    const stub = await startStubUpstream();
    let old: TestGateway | undefined;
    let next: TestGateway | undefined;
    try {
      old = await startTestGateway({ db: 'postgres', postgresUrl: database.url, stub, env: NO_RATE_LIMITS });
      const alice = await old.tenants.create();
      stub.configure({ latencyMs: 3000 });
      const id = expectAccepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('long job'), ASYNC));
      await pollUntil(
        async () => {
          expect((await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body.status).toBe('running');
          expect(stub.hits).toBe(1);
        },
        5000,
        20,
      );

      next = await startTestGateway({ db: 'postgres', postgresUrl: database.url, stub, env: NO_RATE_LIMITS, adminKey: old.adminKey });
      const job = await finished(new ApiClient(next.url, alice.key), id);
      // Both stopped: every run either of them began has ended, and been charged.
      await next.close();
      next = undefined;
      await old.close();
      old = undefined;
      const { rows } = await query<{ n: string }>(database.url, `SELECT count(*) AS n FROM usage_ledger WHERE user_id = $1 AND cost_nanos > 0`, [alice.userId]);
      expect({ status: job.status, attempts: job.attempts, upstreamCalls: stub.hits, charges: Number(rows[0]?.n) }).toEqual({
        status: 'completed',
        attempts: 1,
        upstreamCalls: 1,
        charges: 1,
      });
    } finally {
      await next?.close();
      await old?.close();
      await stub.close();
      await database.drop();
    }
  });
});
