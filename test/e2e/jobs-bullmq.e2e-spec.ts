import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { Env } from '../../src/config/config.js';
import type { WorkerProcess } from '../../src/gateway.js';
import { REDIS_URL } from '../support/databases.js';
import { type ApiClient, type HttpResult, pollUntil, startTestGateway, startWorker, type Tenant, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, startRedisProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

interface JobBody {
  id: string;
  object: string;
  status: 'queued' | 'running' | 'completed' | 'failed';
  result: { object: string; choices: Array<{ message: { content: string } }> } | null;
  error: { code: string; type: string } | null;
  attempts: number;
  dead_lettered: boolean;
}

interface QueueStats {
  driver: string;
  processing: boolean;
  counts: Record<string, number>;
  broker: { waiting: number; active: number; delayed: number } | null;
}

const ASYNC = { prefer: 'respond-async' };
// Polling GET /v1/jobs counts against rate limits like any /v1 call; these tests are not about them.
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };
const chat = (content: string) => ({ model: 'auto', messages: [{ role: 'user', content }] });

async function finished(client: ApiClient, id: string): Promise<JobBody> {
  return pollUntil(
    async () => {
      const res = await client.get<JobBody>(`/v1/jobs/${id}`);
      expect(['completed', 'failed']).toContain(res.body.status);
      return res.body;
    },
    20_000,
    50,
  );
}

function accepted(res: HttpResult<JobBody>): string {
  expect(res.status).toBe(202);
  expect(res.headers.get('location')).toBe(`/v1/jobs/${res.body.id}`);
  return res.body.id;
}

describe('async jobs on BullMQ: an api instance and a separate worker sharing Redis and PostgreSQL', () => {
  const env: Env = {
    ...NO_RATE_LIMITS,
    REDIS_URL,
    REDIS_KEY_PREFIX: uniqueRedisPrefix('jobs-e2e'),
    JOBS_MAX_QUEUED: '3',
    UPSTREAM_RETRY_ATTEMPTS: '1',
    JOBS_BACKOFF_MS: '20',
    JOBS_BACKOFF_MAX_MS: '100',
  };
  let api: TestGateway;
  let worker: WorkerProcess | undefined;
  let alice: Tenant;
  let bob: Tenant;

  beforeAll(async () => {
    api = await startTestGateway({ db: 'postgres', env: { ...env, GATEHOUSE_ROLE: 'api' } });
    alice = await api.tenants.create();
    bob = await api.tenants.create();
  });
  afterAll(async () => {
    await worker?.close();
    await api?.close();
    await dropRedisKeys(env.REDIS_KEY_PREFIX as string);
  });

  it('accepts jobs on the api instance without processing them, up to the bound, then answers 503 queue_full', async () => {
    const a = accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('from the api role'), { ...ASYNC, 'idempotency-key': 'first' }));
    const b = accepted(await bob.api.post<JobBody>('/v1/chat/completions', chat('bob waits'), ASYNC));
    const c = accepted(await alice.api.post<JobBody>('/v1/complete', { prompt: 'third' }, ASYNC));
    const full = await alice.api.post('/v1/chat/completions', chat('one too many'), ASYNC);
    expect(full).toMatchObject({ status: 503, body: { error: { type: 'overloaded_error', code: 'queue_full' } } });
    expect(Number(full.headers.get('retry-after'))).toBeGreaterThan(0);
    // A full queue holds back async submits only: readiness stays 200, or every api instance would
    // leave the load balancer at once while sync calls still work.
    expect((await api.admin.get('/health/ready')).status).toBe(200);
    // A retried submit is answered from its record even while the queue is full.
    const replay = await alice.api.post<JobBody>('/v1/chat/completions', chat('from the api role'), { ...ASYNC, 'idempotency-key': 'first' });
    expect(replay.status).toBe(202);
    expect(replay.body.id).toBe(a);

    const stats = await api.admin.get<QueueStats>('/admin/queue');
    expect(stats.body).toMatchObject({ driver: 'bullmq', processing: false, counts: { queued: 3, running: 0 }, broker: { waiting: 3, active: 0 } });
    expect(api.stub.hits).toBe(0);
    for (const id of [a, b, c]) {
      const waiting = await api.admin.get<JobBody>(`/v1/jobs/${id}`);
      expect(waiting.body.status).toBe('queued');
      expect(waiting.headers.get('retry-after')).toBe('1');
    }

    // Bob's key is revoked while his job waits: it must not run on his behalf.
    expect((await api.admin.delete(`/admin/keys/${bob.keyId}`)).status).toBe(200);

    worker = await startWorker(api, env);
    const done = await finished(alice.api, a);
    expect(done).toMatchObject({ status: 'completed', attempts: 1 });
    expect(done.result?.choices[0]?.message.content).toBe('Mock reply to: from the api role');
    expect((await finished(alice.api, c)).result?.choices[0]?.message.content).toBe('Mock reply to: third');
    const revoked = await finished(api.admin, b);
    expect(revoked).toMatchObject({ status: 'failed', dead_lettered: false, attempts: 1, error: { code: 'invalid_api_key', type: 'authentication_error' } });
    expect(api.stub.hits).toBe(2);

    // Drained: the api instance accepts again.
    const later = accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('after the drain'), ASYNC));
    expect((await finished(alice.api, later)).status).toBe('completed');
  });

  describe('with the worker running', () => {
    beforeAll(async () => {
      worker ??= await startWorker(api, env);
    });
    beforeEach(() => {
      api.stub.reset();
    });

    it('retries through BullMQ: upstream 503 on the first two tries, then OK → completed after 3 attempts', async () => {
      api.stub.configure({ status: 503, failTimes: 2 });
      const id = accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('flaky over bullmq'), ASYNC));
      expect(await finished(alice.api, id)).toMatchObject({ status: 'completed', attempts: 3, dead_lettered: false });
      expect(api.stub.hits).toBe(3);
    });

    it('dead-letters after the last try and completes after an admin retry once the upstream recovers', async () => {
      api.stub.configure({ status: 500 });
      const id = accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('dead over bullmq'), ASYNC));
      expect(await finished(alice.api, id)).toMatchObject({ status: 'failed', attempts: 3, dead_lettered: true });
      const dead = await api.admin.get<{ data: Array<{ id: string }> }>('/admin/queue/dead');
      expect(dead.body.data.map((j) => j.id)).toContain(id);
      api.stub.reset();
      expect((await api.admin.post(`/admin/queue/dead/${id}/retry`)).status).toBe(202);
      const done = await finished(alice.api, id);
      expect(done).toMatchObject({ status: 'completed', attempts: 1, dead_lettered: false });
      expect(done.result?.choices[0]?.message.content).toBe('Mock reply to: dead over bullmq');
    });
  });
});

describe('async jobs when Redis goes away (BullMQ, role all)', () => {
  const prefix = uniqueRedisPrefix('jobs-down');
  let proxy: TcpProxy;
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    proxy = await startRedisProxy();
    gw = await startTestGateway({ db: 'postgres', env: { ...NO_RATE_LIMITS, REDIS_URL: proxy.url, REDIS_KEY_PREFIX: prefix } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await proxy?.start().catch(() => undefined);
    await gw?.close();
    await proxy?.stop();
    await dropRedisKeys(prefix);
  });

  it('refuses async submits with 503 unavailable while sync requests still work, says so in readiness, and recovers', async () => {
    const before = accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('before the outage'), ASYNC));
    expect((await finished(alice.api, before)).status).toBe('completed');

    await proxy.stop();
    await pollUntil(async () => {
      const res = await alice.api.post('/v1/chat/completions', chat('during the outage'), ASYNC);
      expect(res).toMatchObject({ status: 503, body: { error: { type: 'overloaded_error', code: 'unavailable' } } });
    }, 10_000);
    expect((await alice.api.post('/v1/chat/completions', chat('sync during the outage'))).status).toBe(200);
    const ready = await gw.admin.get<{ details: Record<string, { status: string; redis?: string }> }>('/health/ready');
    expect(ready.status).toBe(200);
    expect(ready.body.details.queue).toMatchObject({ status: 'degraded', redis: 'unreachable' });
    // The refused submits left no job records behind.
    expect((await gw.admin.get<QueueStats>('/admin/queue')).body.counts).toMatchObject({ queued: 0, running: 0 });

    await proxy.start();
    const after = await pollUntil(async () => accepted(await alice.api.post<JobBody>('/v1/chat/completions', chat('after the outage'), ASYNC)), 15_000);
    expect((await finished(alice.api, after)).status).toBe('completed');
  });
});

/**
 * A Redis relay that holds back, on the job producer's connection only, the reply to BullMQ's add
 * for `holdMs` while `slow.on`: a latency spike past the queue's 2 s command timeout after Redis
 * ran the add. Everything else passes unchanged.
 */
async function startSlowAddRelay(holdMs: number): Promise<{ url: string; slow: { on: boolean }; close(): Promise<void> }> {
  const target = new URL(REDIS_URL);
  const slow = { on: false };
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect(Number(target.port || 6379), target.hostname);
    sockets.add(client).add(upstream);
    let producer = false;
    let holdUntil = 0;
    const held: Buffer[] = [];
    let timer: NodeJS.Timeout | undefined;
    const flush = () => {
      timer = undefined;
      for (const chunk of held.splice(0)) if (!client.destroyed) client.write(chunk);
    };
    const drop = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.on('data', (chunk: Buffer) => {
      const text = chunk.toString('latin1');
      if (text.includes('gatehouse-jobs-producer')) producer = true;
      // BullMQ's addStandardJob script names the queue's `marker` and `completed` keys; its job counts do not.
      if (producer && slow.on && text.includes(':marker\r\n') && text.includes(':completed\r\n')) holdUntil = Date.now() + holdMs;
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (Date.now() < holdUntil || held.length > 0) {
        held.push(chunk);
        timer ??= setTimeout(flush, Math.max(0, holdUntil - Date.now()));
      } else {
        client.write(chunk);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `redis://127.0.0.1:${(server.address() as AddressInfo).port}`,
    slow,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// Before, the submit was answered 503 "cannot be accepted" (no job id to poll) while the job it
// had made ran and was charged: a client retrying as told paid twice.
describe('an async submit whose BullMQ add is answered after the timeout (BullMQ, role all)', () => {
  const prefix = uniqueRedisPrefix('slow-add');
  let relay: Awaited<ReturnType<typeof startSlowAddRelay>>;
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    relay = await startSlowAddRelay(2500);
    gw = await startTestGateway({
      db: 'postgres',
      env: { ...NO_RATE_LIMITS, REDIS_URL: relay.url, REDIS_KEY_PREFIX: prefix, JOBS_DRIVER: 'bullmq', UPSTREAM_RETRY_ATTEMPTS: '1' },
    });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await relay?.close();
    await dropRedisKeys(prefix);
  });

  it('is accepted (202) with the job it made, which runs once', async () => {
    relay.slow.on = true;
    const res = await alice.api.post<JobBody>('/v1/chat/completions', chat('answered late'), ASYNC);
    relay.slow.on = false;
    const id = accepted(res);
    expect(await finished(alice.api, id)).toMatchObject({ status: 'completed', attempts: 1 });
    expect(gw.stub.hits).toBe(1);
  });
});
