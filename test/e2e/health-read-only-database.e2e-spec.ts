import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REDIS_URL } from '../support/databases.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, type Tenant } from '../support/gateway.js';
import { uniqueRedisPrefix } from '../support/redis.js';

/**
 * After a failover the old primary comes back as a standby (or DATABASE_URL points at a replica,
 * or a DNS name still resolves to the demoted server): PostgreSQL answers every read and refuses
 * every write. Such an instance can serve no completion (the budget reservation is a write), so
 * /health/ready must say it is not ready (503, database down), and it must be ready again once
 * the database takes writes.
 *
 * Simulated with `default_transaction_read_only` on the test's own database (what a standby's
 * sessions see: SQLSTATE 25006 on every write), its connections cut once (the relay in front of
 * the instance under test restarted) so that they reconnect as read-only sessions.
 */
interface Ready {
  status: string;
  details: Record<string, { status: string; message?: string }>;
}

describe('readiness on a database that answers reads and refuses writes', () => {
  let p: ProxiedGateway;
  let alice: Tenant;
  let dbName: string;

  beforeAll(async () => {
    p = await startGatewayBehindPostgresProxy({ env: { REDIS_URL, REDIS_KEY_PREFIX: uniqueRedisPrefix('health-read-only'), BUDGET_LEASE_MS: '0' } });
    alice = await p.owner.tenants.create({ userBudgetUsd: 10 });
    dbName = new URL(p.owner.database.url ?? '').pathname.slice(1);
  });
  afterAll(async () => {
    if (dbName) await readOnly(false).catch(() => undefined);
    await p?.close();
  });

  /** Sets the database's default for new sessions; this session itself writes whatever the default is. */
  async function readOnly(on: boolean): Promise<void> {
    const client = new pg.Client({ connectionString: p.owner.database.url });
    await client.connect();
    try {
      await client.query('SET default_transaction_read_only = off');
      await client.query(
        on ? `ALTER DATABASE "${dbName}" SET default_transaction_read_only = on` : `ALTER DATABASE "${dbName}" RESET default_transaction_read_only`,
      );
    } finally {
      await client.end();
    }
  }

  /** The instance's connections drop and come back, as sessions with the database's current defaults. */
  async function reconnect(): Promise<void> {
    await p.proxy.stop();
    await p.proxy.start();
  }

  it('is not ready (503, database down) while it cannot serve a completion, and ready again once the database takes writes', async () => {
    const api = new ApiClient(p.gw.url, alice.key);
    const ask = () => api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `read only ${Math.random()}` }] });
    expect((await ask()).status).toBe(200);
    expect((await p.gw.admin.get<Ready>('/health/ready')).status).toBe(200);

    await readOnly(true);
    await reconnect();
    await pollUntil(async () => expect((await ask()).status).toBe(503), 15_000, 200);

    const started = Date.now();
    const ready = await p.gw.admin.get<Ready>('/health/ready');
    // Within the probe's time budget (the check is bounded at 2 s; the k8s probe gives 3 s).
    expect(Date.now() - started).toBeLessThan(3000);
    expect(ready.status, JSON.stringify(ready.body)).toBe(503);
    expect(ready.body.details.database, JSON.stringify(ready.body)).toMatchObject({
      status: 'down',
      message: expect.stringContaining('refuses writes') as unknown,
    });

    // An admin write meanwhile is the same dependency down (503), not a bug (500 internal_error,
    // logged with a stack each time); admin reads still work.
    expect((await p.gw.admin.get('/admin/departments')).status).toBe(200);
    const write = await p.gw.admin.post<{ error: { code: string } }>('/admin/departments', { name: `read-only-${Date.now()}` });
    expect({ status: write.status, code: write.body.error?.code }).toEqual({ status: 503, code: 'unavailable' });

    await readOnly(false);
    await reconnect();
    await pollUntil(async () => expect((await ask()).status).toBe(200), 30_000, 200);
    await pollUntil(
      async () => {
        const again = await p.gw.admin.get<Ready>('/health/ready');
        expect(again.status, JSON.stringify(again.body)).toBe(200);
        expect(again.body.details.database?.status).toBe('up');
      },
      30_000,
      200,
    );
  });
});
