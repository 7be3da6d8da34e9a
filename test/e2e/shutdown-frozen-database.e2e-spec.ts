import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../../libs/stub-upstream/src/index.js';
import { provisionTenant, SHIPPED_MEMORY, type StartedGateway, startGateway } from '../../bench/targets.js';
import { assertBundleIsFresh, BUNDLE } from '../support/bundle.js';
import { createPostgresDatabase, REDIS_URL } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';
import { dropRedisKeys, startTcpProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

/**
 * SIGTERM while PostgreSQL holds its connections without answering (frozen, partitioned, a
 * failover in progress): the case where a rollout or a scale-down is likely. Only a process of
 * its own shows it: the signal path (Nest's shutdown hooks, then process.exit) and the time the
 * kubelet gives it. The database sits behind a TCP relay the test freezes; the gateway is the
 * shipped bundle, as `npm start` and the image run it.
 */
const DRAIN_MS = 2000;
/** SHUTDOWN_DRAIN_MS + the bound docs/operations.md gives (8 s) + slack for a loaded machine. */
const EXIT_WITHIN_MS = DRAIN_MS + 8000 + 5000;
/** Before the fix the drain waited behind the audit flush: 15-60 s. */
const DRAINING_WITHIN_MS = 5000;



interface LogLine {
  /** When this test read it (Date.now()): the log's own clock is the gateway's. */
  seenAt: number;
  msg: string;
  raw: string;
}

describe('SIGTERM with PostgreSQL not answering (the shipped process)', () => {
  let stub: StubUpstream;
  let database: { url: string; drop(): Promise<void> };
  let proxy: TcpProxy;
  let gateway: StartedGateway | undefined;
  const prefix = uniqueRedisPrefix('frozen');
  const lines: LogLine[] = [];

  beforeAll(async () => {
    assertBundleIsFresh();
    stub = await startStubUpstream();
    database = await createPostgresDatabase();
    proxy = await startTcpProxy(database.url);
    gateway = await startGateway({
      name: 'frozen-database',
      flavour: 'production',
      stubUrl: stub.url,
      databaseUrl: proxy.url,
      ...SHIPPED_MEMORY,
      entry: BUNDLE,
      env: { REDIS_URL, REDIS_KEY_PREFIX: prefix, LOG_LEVEL: 'info', SHUTDOWN_DRAIN_MS: String(DRAIN_MS) },
    });
    let partial = '';
    gateway.proc.child.stdout?.on('data', (chunk: string) => {
      const text = partial + chunk;
      const complete = text.split('\n');
      partial = complete.pop() ?? '';
      for (const raw of complete) {
        try {
          lines.push({ seenAt: Date.now(), msg: (JSON.parse(raw) as { msg: string }).msg, raw });
        } catch {
          lines.push({ seenAt: Date.now(), msg: raw, raw });
        }
      }
    });
  });
  afterAll(async () => {
    proxy?.thaw();
    await gateway?.cleanup();
    await proxy?.stop();
    await stub?.close();
    await database?.drop();
    await dropRedisKeys(prefix);
  });

  it('starts draining at once, logs what it could not store as lost, and exits within SHUTDOWN_DRAIN_MS + 8 s', { timeout: 120_000 }, async () => {
    const started = gateway as StartedGateway;
    const tenant = await provisionTenant(started.origin, started.adminKey);
    expect(tenant.budgetActive).toBe(true);
    const ask = (content: string, requestId?: string) =>
      fetch(`${started.origin}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json', ...(requestId ? { 'x-request-id': requestId } : {}) },
        body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content }] }),
      });
    // Warm: the writers' pools hold open connections, as in production.
    expect((await ask('warm up')).status).toBe(200);

    // A call past its reservation when the database stops answering: its settle and audit event
    // can only wait in memory, and the writers' flushes hang on connections that never answer.
    stub.configure({ latencyMs: 1000 });
    const hits = stub.hits;
    const requestId = `frozen-${prefix.replace(/\W/g, '')}`;
    const pending = ask('answered while the database is frozen', requestId);
    await pollUntil(() => expect(stub.hits).toBe(hits + 1));
    proxy.freeze();
    expect((await pending).status).toBe(200);
    // Its settle is queued and the budget writer's flush (every 20 ms) is stuck on it.
    await new Promise((resolve) => setTimeout(resolve, 300));

    const sigterm = Date.now();
    started.proc.child.kill('SIGTERM');
    const exited = new Promise<number | null>((resolve) => started.proc.child.once('exit', (code) => resolve(code)));
    // The kubelet's SIGKILL, late enough that the old behaviour still shows (as a late drain or exit).
    const killer = setTimeout(() => started.proc.child.kill('SIGKILL'), EXIT_WITHIN_MS + 30_000);
    const code = await exited;
    clearTimeout(killer);
    const exitedAfterMs = Date.now() - sigterm;
    const seen = (msg: string) => lines.find((l) => l.seenAt >= sigterm && l.msg.startsWith(msg));
    const after = lines.filter((l) => l.seenAt >= sigterm).map((l) => `+${l.seenAt - sigterm} ms ${l.raw.slice(0, 300)}`);
    const log = `exit ${String(code)} after ${exitedAfterMs} ms; lines since SIGTERM:\n${after.join('\n')}`;

    // Readiness went down (and keep-alive answers said `connection: close`) at SIGTERM, not once a flush gave up.
    const draining = seen('draining');
    expect(draining, log).toBeDefined();
    expect((draining?.seenAt ?? Infinity) - sigterm, log).toBeLessThan(DRAINING_WITHIN_MS);
    // What the database did not take is on record as lost, not silently gone.
    const budgetLost = seen('BUDGET CHARGES LOST');
    expect(budgetLost, log).toBeDefined();
    expect(budgetLost?.raw, log).toContain(requestId);
    expect(seen('AUDIT EVENTS LOST'), log).toBeDefined();
    // Within the pod's grace period (preStop 10 s + SHUTDOWN_DRAIN_MS 25 s + 8 s < 45 s), so the kubelet never SIGKILLs it.
    expect(exitedAfterMs, log).toBeLessThan(EXIT_WITHIN_MS);
    expect(code, log).toBe(0);
  });
});
