import { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, startRedisProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

/**
 * Shutdown while Redis holds its connections open without answering (frozen, partitioned, a
 * failover in progress), in the default role (GATEHOUSE_ROLE=all: API + job processing) on BullMQ.
 * BullMQ's ioredis connections have no command timeout and still say "ready"; a graceful
 * Worker.close() then waits for Redis (the last completions, QUIT) for as long as the jobs' grace
 * period (UPSTREAM_DEADLINE_MS + 10 s, 130 s by default), whether or not a job is running, and any
 * pod grace shorter than that ended in SIGKILL before the writers' last flush.
 *
 * docs/operations.md "Graceful shutdown": exited within SIGTERM + SHUTDOWN_DRAIN_MS + 8 s. Redis
 * is reached through a TCP relay the test freezes (the machine's Redis itself is left alone).
 * Run in process: app.close() runs the shutdown hooks a SIGTERM does, including @nestjs/bullmq's,
 * which awaits the worker's close again.
 */
const DRAIN_MS = 2000;
/** SHUTDOWN_DRAIN_MS + the bound docs/operations.md gives (8 s) + slack for a loaded machine. */
const CLOSED_WITHIN_MS = DRAIN_MS + 8000 + 5000;
/** How long the job of the second case takes upstream: the shutdown waits for it. */
const JOB_LATENCY_MS = 2500;

interface Logged {
  msg: string;
  raw: string;
}

describe('shutdown with Redis not answering (GATEHOUSE_ROLE=all, BullMQ)', () => {
  let proxy: TcpProxy | undefined;
  let gw: TestGateway | undefined;
  let prefix = '';
  const lines: Logged[] = [];

  const start = async () => {
    lines.length = 0;
    prefix = uniqueRedisPrefix('frozen-redis');
    proxy = await startRedisProxy();
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        for (const raw of chunk.toString('utf8').split('\n').filter(Boolean)) {
          try {
            lines.push({ msg: (JSON.parse(raw) as { msg: string }).msg, raw });
          } catch {
            lines.push({ msg: raw, raw });
          }
        }
        done();
      },
    });
    gw = await startTestGateway({
      db: 'postgres',
      logger: createLogger('info', sink),
      env: { GATEHOUSE_ROLE: 'all', JOBS_DRIVER: 'bullmq', REDIS_URL: proxy.url, REDIS_KEY_PREFIX: prefix, SHUTDOWN_DRAIN_MS: String(DRAIN_MS) },
    });
    return gw;
  };

  /** Closes the gateway; resolves with how long that took, or 'still closing' a little after the bound (thawing Redis then lets it finish). */
  const timedClose = async (started: TestGateway): Promise<number | 'still closing'> => {
    const closing = performance.now();
    const closed = started.close().then(() => performance.now() - closing);
    let timer: NodeJS.Timeout | undefined;
    const giveUp = new Promise<'still closing'>((resolve) => (timer = setTimeout(() => resolve('still closing'), CLOSED_WITHIN_MS + 5000)));
    const outcome = await Promise.race([closed, giveUp]);
    clearTimeout(timer);
    proxy?.thaw();
    await closed.catch(() => undefined);
    gw = undefined;
    return outcome;
  };

  const logOf = (outcome: number | 'still closing') =>
    `close took ${typeof outcome === 'number' ? `${Math.round(outcome)} ms` : outcome}; jobs log:\n${lines
      .filter((l) => l.raw.includes('"context":"Jobs"'))
      .map((l) => l.raw.slice(0, 300))
      .join('\n')}`;

  const logged = (msg: string) => lines.some((l) => l.msg.startsWith(msg));

  afterEach(async () => {
    proxy?.thaw();
    await gw?.close().catch(() => undefined);
    gw = undefined;
    await proxy?.stop();
    proxy = undefined;
    await dropRedisKeys(prefix);
  });

  it('closes within SHUTDOWN_DRAIN_MS + 8 s with no job running, and says Redis did not answer', { timeout: 90_000 }, async () => {
    const started = await start();
    const alice = await started.tenants.create();
    const res = await alice.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'before the freeze' }] });
    expect(res.status).toBe(200);

    proxy!.freeze();
    // Long enough for the gateway's own Redis client to notice (1 s command timeout).
    await new Promise((resolve) => setTimeout(resolve, 3000));

    const outcome = await timedClose(started);
    const log = logOf(outcome);
    expect(outcome, log).toBeTypeOf('number');
    expect(outcome as number, log).toBeLessThan(CLOSED_WITHIN_MS);
    expect(logged('Redis did not answer the worker’s close'), log).toBe(true);
    // Nothing was running: not reported as a job that ignored its abort.
    expect(logged('a running job ignored the shutdown'), log).toBe(false);
  });

  it('waits for a job running when Redis froze, then closes within SHUTDOWN_DRAIN_MS + 8 s of its end', { timeout: 90_000 }, async () => {
    const started = await start();
    const alice = await started.tenants.create();
    started.stub.configure({ latencyMs: JOB_LATENCY_MS });
    const hits = started.stub.hits;
    const submit = await alice.api.post<{ id: string }>(
      '/v1/chat/completions',
      { model: 'auto', messages: [{ role: 'user', content: 'a job running as Redis freezes' }] },
      { prefer: 'respond-async' },
    );
    expect(submit.status).toBe(202);
    // The worker runs it: its upstream call has reached the stub, which answers after JOB_LATENCY_MS.
    await pollUntil(() => expect(started.stub.hits).toBe(hits + 1));
    const upstreamAnswersAt = performance.now() + JOB_LATENCY_MS;
    proxy!.freeze();

    const closeStartedAt = performance.now();
    const outcome = await timedClose(started);
    const log = logOf(outcome);
    expect(outcome, log).toBeTypeOf('number');
    // Waited for the job (not aborted at once), and not for the grace period once it had ended.
    expect(closeStartedAt + (outcome as number), log).toBeGreaterThan(upstreamAnswersAt);
    expect(outcome as number, log).toBeLessThan(JOB_LATENCY_MS + CLOSED_WITHIN_MS);
    expect(logged('a running job ignored the shutdown'), log).toBe(false);
  });
});
