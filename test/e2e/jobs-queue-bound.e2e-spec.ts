import { type AddressInfo, connect, createServer, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Env } from '../../src/config/config.js';
import { REDIS_URL } from '../support/databases.js';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, uniqueRedisPrefix } from '../support/redis.js';

// These tests are about the queue's bound, not the rate limits that would refuse 20 calls first.
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };
const chat = (content: string) => ({ model: 'auto', messages: [{ role: 'user', content }] });

interface QueueStats {
  counts: { queued: number; running: number };
  broker: { waiting: number; active: number; delayed: number } | null;
}

/** 20 async submits at once, answered: at most JOBS_MAX_QUEUED (3) of them 202, the rest 503 queue_full. */
async function submitTwentyAtOnce(alice: Tenant): Promise<Array<HttpResult<unknown>>> {
  const results = await Promise.all(
    Array.from({ length: 20 }, (_, i) => alice.api.post('/v1/chat/completions', chat(`parallel ${i}`), { prefer: 'respond-async' })),
  );
  expect(results.filter((r) => r.status === 202)).toHaveLength(3);
  for (const r of results.filter((r) => r.status !== 202)) expect(r).toMatchObject({ status: 503, body: { error: { code: 'queue_full' } } });
  return results;
}

/**
 * A relay to the test Redis that passes every reply on `lagMs` late, in order: a Redis a network
 * hop away, where the submits' round trips overlap as they do in production.
 */
async function startLaggingRedis(lagMs: number): Promise<{ url: string; close: () => Promise<void> }> {
  const target = new URL(REDIS_URL);
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(Number(target.port || 6379), target.hostname);
    sockets.add(client).add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.on('data', (chunk: Buffer) => upstream.write(chunk));
    // Timers of one delay fire in the order they were set: replies keep their order.
    upstream.on('data', (chunk: Buffer) => setTimeout(() => client.destroyed || client.write(chunk), lagMs));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = new URL(REDIS_URL);
  url.hostname = '127.0.0.1';
  url.port = String((server.address() as AddressInfo).port);
  return {
    url: url.toString(),
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// Before, the bound was read and then the job added, as two round trips: 11 of 20 were accepted.
describe('JOBS_MAX_QUEUED under 20 parallel async submits, BullMQ (api role: nothing drains)', () => {
  const prefix = uniqueRedisPrefix('jobs-bound');
  let redis: Awaited<ReturnType<typeof startLaggingRedis>>;
  let gw: TestGateway;
  let alice: Tenant;
  beforeAll(async () => {
    redis = await startLaggingRedis(20);
    const env: Env = { ...NO_RATE_LIMITS, REDIS_URL: redis.url, REDIS_KEY_PREFIX: prefix, JOBS_MAX_QUEUED: '3', GATEHOUSE_ROLE: 'api' };
    gw = await startTestGateway({ db: 'postgres', env });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await redis?.close();
    await dropRedisKeys(prefix);
  });

  it('accepts exactly JOBS_MAX_QUEUED and refuses the rest with 503 queue_full', async () => {
    await submitTwentyAtOnce(alice);
    const stats = await gw.admin.get<QueueStats>('/admin/queue');
    expect(stats.body).toMatchObject({ counts: { queued: 3, running: 0 }, broker: { waiting: 3, active: 0, delayed: 0 } });
  });
});

describe('JOBS_MAX_QUEUED under 20 parallel async submits, inline queue (the upstream answers too late for anything to drain)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...NO_RATE_LIMITS, JOBS_MAX_QUEUED: '3', JOBS_CONCURRENCY: '1' } });
    alice = await gw.tenants.create();
    gw.stub.configure({ latencyMs: 8000 });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('accepts exactly JOBS_MAX_QUEUED (one running, two waiting) and refuses the rest with 503 queue_full', async () => {
    await submitTwentyAtOnce(alice);
    // The first job's row says running once its try has begun.
    await pollUntil(async () => expect((await gw.admin.get<QueueStats>('/admin/queue')).body.counts).toMatchObject({ queued: 2, running: 1 }));
  });
});
