import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, type Tenant, type TestGateway } from '../support/gateway.js';
import type { TcpProxy } from '../support/redis.js';
import { FRESH, heldRows, REQUEST, storedBudget } from './budget-support.js';

// A reservation answered 503 because the database did not answer in time must not leave a hold
// behind that nothing settles (until the sweeper, 10 minutes later): the statement may have
// committed on the server after the gateway gave up on it. Only PostgreSQL has a client-side
// timeout, or a network between the gateway and the database.

const TIMEOUT_MS = 2000;

describe('a reservation the gateway gave up on (postgres)', () => {
  let gateways: ProxiedGateway;
  let owner: TestGateway;
  let proxy: TcpProxy;
  let gw: TestGateway;
  /** Holds a budget row locked, as a long flush of another instance would. */
  let locker: pg.Client;
  /** Watches pg_stat_activity from outside any transaction (inside one, what it shows is a snapshot). */
  let monitor: pg.Client;

  beforeAll(async () => {
    gateways = await startGatewayBehindPostgresProxy({ env: { DATABASE_REQUEST_TIMEOUT_MS: String(TIMEOUT_MS) } });
    ({ owner, proxy, gw } = gateways);
    locker = new pg.Client({ connectionString: owner.database.url });
    await locker.connect();
    monitor = new pg.Client({ connectionString: owner.database.url });
    await monitor.connect();
  });
  afterAll(async () => {
    proxy?.thaw();
    await locker?.end();
    await monitor?.end();
    await gateways?.close();
  });

  /** The gateway's reservation statements: waiting on a lock, or still running at all. */
  async function holdStatements(wait?: 'Lock'): Promise<number> {
    const { rows } = await monitor.query<{ n: string }>(
      `SELECT count(*) AS n FROM pg_stat_activity
        WHERE datname = current_database() AND application_name = 'gatehouse-budget-hold' AND state = 'active' AND ($1::text IS NULL OR wait_event_type = $1)`,
      [wait ?? null],
    );
    return Number(rows[0]?.n);
  }

  /** What must hold once the statement has ended on the server: nothing of the refused request is held. */
  async function expectNothingHeld(t: Tenant): Promise<void> {
    await pollUntil(async () => expect(await holdStatements()).toBe(0), 10_000);
    await pollUntil(
      async () => {
        expect(await heldRows(owner, t.userId)).toEqual([]);
        expect((await storedBudget(owner, 'user', t.userId, { flush: false })).reserved).toBe(0n);
        expect((await storedBudget(owner, 'department', t.departmentId, { flush: false })).reserved).toBe(0n);
      },
      3 * TIMEOUT_MS + 5000,
    );
  }

  async function lockUserBudget(t: Tenant): Promise<void> {
    await locker.query('BEGIN');
    await locker.query(`SELECT 1 FROM budgets WHERE scope = 'user' AND scope_id = $1 FOR UPDATE`, [t.userId]);
  }

  it('holds nothing once the statement that waited on a row lock past the timeout is over, though the writer flushed before the lock was free', async () => {
    const t = await owner.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const hits = owner.stub.hits;
    await lockUserBudget(t);
    let res;
    try {
      res = await new ApiClient(gw.url, t.key).post('/v1/chat/completions', REQUEST, FRESH);
      // A release of the refused reservation stored now would find no row yet: too early to help.
      expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    } finally {
      await locker.query('COMMIT');
    }
    expect(res.status).toBe(503);
    expect(owner.stub.hits).toBe(hits);
    await expectNothingHeld(t);
  });

  it('releases a hold committed after the gateway gave up on its statement (the answer was lost on the way back)', async () => {
    const t = await owner.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    await lockUserBudget(t);
    let res;
    try {
      const pending = new ApiClient(gw.url, t.key).post('/v1/chat/completions', REQUEST, FRESH);
      // The statement reached the server and waits on the lock; from now on nothing comes back.
      await pollUntil(async () => expect(await holdStatements('Lock')).toBe(1));
      proxy.freeze();
      // The statement goes on and commits its hold; its answer never reaches the gateway, which gives up.
      await locker.query('COMMIT');
      res = await pending;
    } finally {
      proxy.thaw();
      await locker.query('ROLLBACK').catch(() => undefined);
    }
    expect(res.status).toBe(503);
    await expectNothingHeld(t);
    // And the pair is served again.
    expect((await new ApiClient(gw.url, t.key).post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
  });
});
