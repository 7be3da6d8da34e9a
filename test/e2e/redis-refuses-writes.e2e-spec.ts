import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { type ApiClient, type HttpResult, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
/** A redis-server of the test's own, on a free port: the shared one is never demoted. */
async function startOwnRedis(): Promise<{ url: string; cli: (...args: string[]) => string; stop: () => Promise<void> }> {
  const port = await freePort();
  const redis: ChildProcess = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const cli = (...args: string[]) => execFileSync('redis-cli', ['-p', String(port), ...args]).toString().trim();
  await pollUntil(() => expect(cli('PING')).toBe('PONG'), 5000, 50);
  return {
    url: `redis://127.0.0.1:${port}`,
    cli,
    stop: async () => {
      if (redis.exitCode !== null || redis.signalCode !== null) return;
      const exited = once(redis, 'exit');
      redis.kill('SIGKILL');
      await exited;
    },
  };
}

const ask = (client: ApiClient) =>
  client.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `refused ${randomBytes(4).toString('hex')}` }] });
const cacheOf = (res: HttpResult) => res.headers.get('x-gateway-cache');

type Readiness = { status: string; details: Record<string, { status: string; reason?: string; mode?: string }> };

const RL_DOWN = 'Redis unavailable: rate limits fall back to per-instance memory counters';
const RL_BACK = 'Redis back: rate limits shared across instances again';
const CACHE_DOWN = 'Redis unavailable: response cache bypassed';
const CACHE_BACK = 'Redis back: response cache in use again';

/**
 * A Redis primary demoted to a replica while the gateway runs (a failover behind a fixed
 * address): the connection stays up and PING answers, but every write is refused (READONLY).
 * Being connected must not pass for working: readiness says degraded, and the log says so once,
 * until a write goes through again. Runs its own redis-server: the shared one is never demoted.
 */
describe('Redis that stays connected but refuses writes', () => {
  let redis: Awaited<ReturnType<typeof startOwnRedis>> | undefined;
  let gw: TestGateway;
  const lines: Array<{ msg?: string; reason?: string }> = [];
  const count = (msg: string) => lines.filter((l) => l.msg === msg).length;
  const cli = (...args: string[]) => (redis as NonNullable<typeof redis>).cli(...args);
  const ready = async () => (await gw.admin.get<Readiness>('/health/ready')).body;

  beforeAll(async () => {
    redis = await startOwnRedis();
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        for (const line of chunk.toString().split('\n')) if (line) lines.push(JSON.parse(line) as { msg?: string });
        done();
      },
    });
    gw = await startTestGateway({ env: { REDIS_URL: redis.url, RATE_LIMIT_KEY_RPM: '3' }, logger: createLogger('info', sink) });
  });
  afterAll(async () => {
    await gw?.close();
    await redis?.stop();
  });

  it('says degraded, with the reason, and logs it once until a write goes through; then up again with no traffic', async () => {
    const t = await gw.tenants.create();
    expect((await ask(t.api)).status).toBe(200);
    expect((await ready()).details).toMatchObject({ rate_limit: { status: 'up' }, cache: { status: 'up' } });

    // Demoted: the old primary now follows one it cannot reach, and still answers reads and PING.
    cli('REPLICAOF', '127.0.0.1', '1');

    // Limits fall back to this instance's memory counters (a fresh count: 3 more are admitted).
    const during: Array<number | string | null> = [];
    for (let i = 0; i < 4; i++) {
      const res = await ask(t.api);
      during.push(res.status, cacheOf(res));
      // A kubelet's readiness probe between requests: each one used to say up, and log it.
      await ready();
    }
    expect(during).toEqual([200, 'bypass', 200, 'bypass', 200, 'bypass', 429, null]);
    const degraded = await ready();
    expect(degraded.status).toBe('degraded');
    expect(degraded.details.rate_limit).toMatchObject({ status: 'degraded', mode: 'per-instance memory counters', reason: expect.stringMatching(/^READONLY/) });
    expect(degraded.details.cache).toMatchObject({ status: 'degraded', reason: expect.stringMatching(/^READONLY/) });
    expect(degraded.details.redis).toMatchObject({ status: 'up' }); // it answers PING
    expect({ rl: [count(RL_DOWN), count(RL_BACK)], cache: [count(CACHE_DOWN), count(CACHE_BACK)] }).toEqual({ rl: [1, 0], cache: [1, 0] });

    // Promoted again. No request comes: the readiness check's own write finds out.
    cli('REPLICAOF', 'NO', 'ONE');
    await pollUntil(async () => expect((await ready()).status).toBe('ok'), 5000, 50);
    expect({ rl: [count(RL_DOWN), count(RL_BACK)], cache: [count(CACHE_DOWN), count(CACHE_BACK)] }).toEqual({ rl: [1, 1], cache: [1, 1] });
    // Counted in Redis again, where this key made 1 request before the demotion.
    const after = await ask(t.api);
    expect(after.status).toBe(200);
    expect(after.headers.get('x-ratelimit-remaining-requests')).toBe('1');
  });

  it('stays degraded while a caller already at its limit is refused: a refusal writes nothing, so it proves no write', async () => {
    const limited = await gw.tenants.create();
    const other = await gw.tenants.create();
    expect((await gw.admin.put(`/admin/rate-limits/keys/${limited.keyId}`, { requests_per_minute: 2 })).status).toBe(200);
    expect((await ask(limited.api)).status).toBe(200);
    expect((await ask(limited.api)).status).toBe(200); // at its limit, counted in Redis
    const before = [count(RL_DOWN), count(RL_BACK)];

    cli('REPLICAOF', '127.0.0.1', '1');
    try {
      for (let i = 0; i < 3; i++) {
        expect((await ask(other.api)).status).toBe(200); // its count is a write: refused, memory counters
        expect((await ask(limited.api)).status).toBe(429); // Redis still reads its count, and refuses
      }
      // Each refusal read as "Redis back" flipped readiness to up and logged a recovery, and the
      // next write logged the outage again: a pair of lines per request under load.
      const state = await ready();
      expect({ rl: state.details.rate_limit?.status, down: count(RL_DOWN) - (before[0] ?? 0), back: count(RL_BACK) - (before[1] ?? 0) }).toEqual({
        rl: 'degraded',
        down: 1,
        back: 0,
      });
    } finally {
      cli('REPLICAOF', 'NO', 'ONE');
    }
  });
});

/**
 * The job workers' blocking connection, told of a demotion ("UNBLOCKED … master -> replica?"),
 * reconnects; a shutdown that disconnected it between two reconnects waited for an 'end' ioredis
 * never sends (redis/ioredis#1247), and so did Nest's own close of the worker: the process never
 * exited. docs/operations.md: with no job running the workers hold a shutdown a few seconds.
 */
describe('a shutdown soon after a brief Redis failover', () => {
  it('ends within seconds, with no job running', async () => {
    const redis = await startOwnRedis();
    const gw = await startTestGateway({ env: { REDIS_URL: redis.url } });
    let closed: boolean | undefined;
    try {
      const t = await gw.tenants.create();
      redis.cli('REPLICAOF', '127.0.0.1', '1');
      for (let i = 0; i < 3; i++) expect((await ask(t.api)).status).toBe(200);
      redis.cli('REPLICAOF', 'NO', 'ONE');
      closed = await Promise.race([gw.close().then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 12_000).unref())]);
      expect(closed, 'the gateway closed').toBe(true);
    } finally {
      await redis.stop();
    }
  }, 40_000);
});
