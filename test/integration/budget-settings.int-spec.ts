import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FLUSH_SQL } from '../../src/budget/budget-sql.js';
import type { BudgetView } from '../../src/budget/budget.types.js';
import { periodStarts } from '../../src/budget/periods.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { ledgerSum, MODEL, storedBudget } from './budget-support.js';

// A budget's period changed while a flush is charging it: the new period's `spent` is the
// ledger's sum for it, the flush's rows included. Only PostgreSQL has a second session that can
// hold the row mid-flush; on PGlite's one session a flush never runs inside an admin call's
// transaction (test/e2e/budget.e2e-spec.ts covers the period change itself on both databases).

const HALF_USD = 500_000_000n;

describe('changing a budget while another instance flushes (postgres)', () => {
  let gw: TestGateway;
  /** Another instance's writer: runs FLUSH_SQL in a transaction it commits when told. */
  let other: pg.Client;
  let monitor: pg.Client;

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres' });
    other = new pg.Client({ connectionString: gw.database.url });
    monitor = new pg.Client({ connectionString: gw.database.url });
    await Promise.all([other.connect(), monitor.connect()]);
  });
  afterAll(async () => {
    await other?.end();
    await monitor?.end();
    await gw?.close();
  });

  /** Another instance's flush of one settle costing `cost` on `t`, left uncommitted: its ledger row is written and the budget rows locked. */
  async function flushing(t: Tenant, cost: bigint): Promise<void> {
    const now = new Date();
    const starts = periodStarts(now);
    const row = {
      charge_id: randomUUID(),
      request_id: 'other-instance',
      attempt: 0,
      key_id: t.keyId,
      user_id: t.userId,
      department_id: t.departmentId,
      model: MODEL,
      prompt_tokens: 1,
      completion_tokens: 1,
      cost_nanos: cost.toString(),
      cost_source: 'upstream',
      status: 200,
      outcome: 'ok',
      cache: null,
      task_type: 'general',
      door: 'chat',
      created_at: now.toISOString(),
    };
    await other.query('BEGIN');
    await other.query(FLUSH_SQL, [now.toISOString(), starts.day.toISOString(), starts.week.toISOString(), starts.month.toISOString(), '[]', JSON.stringify([row]), '[]']);
  }

  /** Waits until the admin call waits on the flush's row lock, then lets the flush commit. */
  async function commitOnceWaitedFor(): Promise<void> {
    await pollUntil(async () => {
      const { rows } = await monitor.query<{ n: string }>(
        `SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> $1`,
        [(other as unknown as { processID: number }).processID],
      );
      expect(Number(rows[0]?.n)).toBe(1);
    });
    await other.query('COMMIT');
  }

  it.each(['user', 'department'] as const)('counts the flush in the new period of a %s budget whose period changed meanwhile', async (scope) => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1, period: 'monthly' });
    const id = scope === 'user' ? t.userId : t.departmentId;
    await flushing(t, HALF_USD);
    const put = gw.admin.put<BudgetView>(`/admin/budgets/${scope}s/${id}`, { limit_usd: 1, period: 'daily' });
    await commitOnceWaitedFor();
    const res = await put;
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ period: 'daily', spent_usd: 0.5 });
    const stored = await storedBudget(gw, scope, id);
    expect(stored.spent).toBe(HALF_USD);
    expect(stored.spent).toBe(await ledgerSum(gw, scope, id, stored.periodStart));
  });

  it('keeps spent, the flush included, when only the limit changes meanwhile', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'monthly' });
    await flushing(t, HALF_USD);
    const put = gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: 2, period: 'monthly' });
    await commitOnceWaitedFor();
    expect((await put).body).toMatchObject({ limit_usd: 2, period: 'monthly', spent_usd: 0.5 });
    const stored = await storedBudget(gw, 'user', t.userId);
    expect(stored.spent).toBe(await ledgerSum(gw, 'user', t.userId, stored.periodStart));
  });

  it('sets a budget whose period change meets a DELETE of it: the budget exists afterwards, with the new period', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'monthly' });
    const spent = await gw.admin.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'spend a little' }] }, { authorization: `Bearer ${t.key}` });
    expect(spent.status).toBe(200);
    // Its charge is stored now (a budget read flushes), so the PUT's own flush has none to wait for.
    expect((await gw.admin.get<BudgetView>(`/admin/budgets/users/${t.userId}`)).body).toMatchObject({ period: 'monthly' });
    // FOR KEY SHARE lets the PUT's upsert (a limit is no key) through and holds its period
    // change's FOR UPDATE; the row is then deleted under it, as another admin's DELETE would.
    await other.query('BEGIN');
    await other.query('SELECT 1 FROM budgets WHERE scope = $1 AND scope_id = $2::uuid FOR KEY SHARE', ['user', t.userId]);
    const put = gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: 3, period: 'daily' });
    await pollUntil(async () => {
      const { rows } = await monitor.query<{ n: string }>(
        `SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'`,
      );
      expect(Number(rows[0]?.n)).toBe(1);
    });
    await other.query('DELETE FROM budgets WHERE scope = $1 AND scope_id = $2::uuid', ['user', t.userId]);
    await other.query('COMMIT');
    const res = await put;
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ limit_usd: 3, period: 'daily' });
    const stored = await storedBudget(gw, 'user', t.userId);
    expect(stored.spent).toBe(await ledgerSum(gw, 'user', t.userId, stored.periodStart));
    expect((await gw.admin.get<BudgetView>(`/admin/budgets/users/${t.userId}`)).body).toMatchObject({ limit_usd: 3, period: 'daily' });
  });
});
