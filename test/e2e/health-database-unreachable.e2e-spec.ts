import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy } from '../support/gateway.js';

/**
 * The database goes away from one instance: refused (stopped, restarted) or holding its
 * connections without answering (frozen, partitioned, failing over). Readiness must say 503,
 * database down, inside the probe's 3 s timeout (docker/k8s/api-deployment.yaml): a probe that
 * times out instead tells the operator nothing. Liveness runs no check and stays 200, or one
 * database outage would restart every pod at once (docs/operations.md "Health probes").
 */
interface Ready {
  status: string;
  details: Record<string, { status: string; message?: string }>;
}

/** The readiness probe's `timeoutSeconds`. */
const PROBE_TIMEOUT_MS = 3000;

async function timedReady(url: string): Promise<{ status: number; ms: number; body: Ready }> {
  const started = performance.now();
  const res = await fetch(`${url}/health/ready`, { signal: AbortSignal.timeout(10_000) });
  const body = (await res.json()) as Ready;
  return { status: res.status, ms: performance.now() - started, body };
}

describe('readiness and liveness with PostgreSQL out of reach', () => {
  let p: ProxiedGateway;
  beforeAll(async () => {
    p = await startGatewayBehindPostgresProxy();
  }, 60_000);
  afterAll(async () => {
    await p?.close();
  });

  it('stopped: ready 503 (database down) within the probe timeout, live 200, ready again once it is back', async () => {
    expect((await timedReady(p.gw.url)).status).toBe(200);
    await p.proxy.stop();
    const down = await timedReady(p.gw.url);
    expect(down.status, JSON.stringify(down.body)).toBe(503);
    expect(down.body.details.database?.status).toBe('down');
    expect(down.ms).toBeLessThan(PROBE_TIMEOUT_MS);
    expect((await fetch(`${p.gw.url}/health/live`)).status).toBe(200);
    await p.proxy.start();
    await pollUntil(async () => expect((await timedReady(p.gw.url)).status).toBe(200), 20_000, 200);
  }, 60_000);

  it('frozen: ready 503 (database down) within the probe timeout, probe after probe, live 200, ready again after the thaw', async () => {
    await pollUntil(async () => expect((await timedReady(p.gw.url)).status).toBe(200), 20_000, 200);
    p.proxy.freeze();
    const probes = [await timedReady(p.gw.url), await timedReady(p.gw.url)];
    const live = (await fetch(`${p.gw.url}/health/live`, { signal: AbortSignal.timeout(10_000) })).status;
    p.proxy.thaw();
    for (const r of probes) {
      expect(r.status, JSON.stringify(r.body)).toBe(503);
      expect(r.body.details.database?.status).toBe('down');
      expect(r.ms).toBeLessThan(PROBE_TIMEOUT_MS);
    }
    expect(live).toBe(200);
    await pollUntil(async () => expect((await timedReady(p.gw.url)).status).toBe(200), 20_000, 200);
  }, 60_000);
});
