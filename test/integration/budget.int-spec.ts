import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { formatUsd, parseUsd } from '../../libs/money/src/index.js';
import { stubCost } from '../../libs/stub-upstream/src/index.js';
import { RESERVE_SQL, SETTLE_SQL } from '../../src/budget/budget-sql.js';
import { BudgetSweeper } from '../../src/budget/budget-sweeper.service.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ManualClock } from '../../src/core/clock.js';
import type { Principal } from '../../src/identity/principal.js';
import { DB_KINDS, PG_ADMIN_URL } from '../support/databases.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { dataSourceOf, ledgerRows, ledgerSum, storedBudget, worstCaseNanos } from './budget-support.js';

// Reservation, settlement, rollover and the sweeper against each real database, through the
// real HTTP gateway and the stub upstream. Time is a ManualClock: the SQL takes "now" from it.

const MODEL = 'openai/gpt-4o-mini';
const MAX_TOKENS = 100;
const BODY = { messages: [{ role: 'user', content: 'hi' }] };
const REQUEST = { ...BODY, model: MODEL, max_tokens: MAX_TOKENS };
const WEDNESDAY_NOON = '2026-01-07T12:00:00.000Z';
/** Identical requests would be answered by the response cache (free, no reservation): skip it. */
const FRESH = { 'cache-control': 'no-cache, no-store' };

interface ErrorBody {
  error: { code: string; param: string | null; message: string; type: string; resets_at?: string | null };
}

function principalOf(t: Tenant): Principal {
  return { keyId: t.keyId, keyPrefix: 'test', userId: t.userId, departmentId: t.departmentId, role: 'user', cacheScope: 'user', expiresAt: undefined };
}

describe.each(DB_KINDS)('budgets on %s', (db) => {
  let gw: TestGateway;
  const clock = new ManualClock(Date.parse(WEDNESDAY_NOON));
  /** Worst case of REQUEST: the unit "a budget that covers N requests" is measured in. */
  let worst: bigint;

  beforeAll(async () => {
    gw = await startTestGateway({ db, clock });
    worst = worstCaseNanos(gw, BODY, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
    clock.set(WEDNESDAY_NOON);
  });

  it('serves at most what the budget covers when 50 requests race for it (spent == Σ ledger, nothing left reserved)', async () => {
    // Every answer uses its whole cap, so each costs nearly its worst case.
    gw.stub.configure({ completionTokens: MAX_TOKENS });
    const limit = (worst * 11n) / 2n; // room for 5 worst cases, not 6
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(limit), departmentBudgetUsd: 1000, period: 'daily' });

    const results = await Promise.all(Array.from({ length: 50 }, () => t.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH)));

    const served = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 402);
    expect(served).toHaveLength(5);
    expect(refused).toHaveLength(45);
    for (const r of refused) {
      expect(r.body.error).toMatchObject({ code: 'budget_exceeded', type: 'insufficient_quota', param: 'user', resets_at: '2026-01-08T00:00:00.000Z' });
    }
    expect(gw.stub.hits).toBe(5);

    const user = await storedBudget(gw, 'user', t.userId);
    const department = await storedBudget(gw, 'department', t.departmentId);
    expect(user.reserved).toBe(0n);
    expect(department.reserved).toBe(0n);
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
    expect(department.spent).toBe(await ledgerSum(gw, 'department', t.departmentId, department.periodStart));
    // What callers were told they were charged is what the budget and the ledger hold.
    const charged = served.reduce((sum, r) => sum + (parseUsd(r.headers.get('x-gateway-cost-usd') ?? 'x') ?? -1n), 0n);
    expect(charged).toBe(user.spent);
    expect(user.spent).toBe(5n * parseUsd(stubCost(MODEL, 1, MAX_TOKENS))!);

    console.info(
      `[budget concurrency] ${db}: fired 50, served ${served.length}, refused ${refused.length}; spent $${formatUsd(user.spent)} of limit $${formatUsd(user.limit)} (worst case per request $${formatUsd(worst)})`,
    );
  });

  it('reserves all or nothing on user and department: 200 concurrent reservations, the tighter scope decides', async () => {
    const budget = gw.gateway.app.get(BudgetService);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    // User holds 5 worst cases, the department only 3: exactly 3 may be granted, and never a
    // reservation on one scope without the other.
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worst * 5n), departmentBudgetUsd: formatUsd(worst * 3n), period: 'daily' });
    const call = (i: number) => ({ principal: principalOf(t), requestId: `race-${i}`, door: 'chat', body: BODY });

    const outcomes = await Promise.allSettled(Array.from({ length: 200 }, (_, i) => budget.reserve(call(i), route)));

    const granted = outcomes.filter((o) => o.status === 'fulfilled');
    expect(granted).toHaveLength(3);
    for (const o of outcomes) {
      if (o.status === 'rejected') expect(o.reason).toMatchObject({ code: 'budget_exceeded', param: 'department' });
    }
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(3n * worst);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(3n * worst);

    // Releasing them (failed attempts, no usage) gives everything back and charges nothing.
    await Promise.all(granted.map((o) => budget.settle(o.value, [{ model: MODEL, ok: false, status: 503, failure: 'http', usage: undefined }])));
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(0n);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(0n);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows).toHaveLength(3);
    expect(rows.every((r) => r.cost_nanos === '0' && r.cost_source === 'none' && r.outcome === 'http' && r.status === 503)).toBe(true);
  });

  it('adds two database round trips per request: one to reserve, one to settle (fallback attempts included), one to refuse', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const ds = dataSourceOf(gw);
    const budgetStatements: string[] = [];
    const query = ds.query.bind(ds);
    const spy = vi.spyOn(ds, 'query').mockImplementation((...args: Parameters<typeof query>) => {
      const sql = args[0];
      if (/budgets|budget_reservations|usage_ledger/.test(sql))
        budgetStatements.push(sql === RESERVE_SQL ? 'reserve' : sql === SETTLE_SQL ? 'settle' : sql.slice(0, 40));
      // Every argument passes through: a query runner given as the third one must be kept.
      return query(...args);
    });
    try {
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(budgetStatements).toEqual(['reserve', 'settle']);

      budgetStatements.length = 0;
      gw.stub.configure({ models: { [MODEL]: { status: 503, failTimes: 1 } } });
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(gw.stub.hits).toBeGreaterThanOrEqual(2);
      expect(budgetStatements).toEqual(['reserve', 'settle']);

      budgetStatements.length = 0;
      await gw.admin.put(`/admin/budgets/users/${t.userId}`, { limit_usd: 0, period: 'daily' });
      budgetStatements.length = 0;
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(402);
      expect(budgetStatements).toEqual(['reserve']);
    } finally {
      spy.mockRestore();
    }
  });

  it('refuses when the department cannot cover the request though the user can, naming the department', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 10, departmentBudgetUsd: formatUsd(worst / 2n), period: 'monthly' });
    const colleague = await gw.tenants.create({ departmentId: t.departmentId });

    for (const who of [t, colleague]) {
      const res = await who.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
      expect(res.status).toBe(402);
      expect(res.body.error).toMatchObject({ code: 'budget_exceeded', param: 'department', resets_at: '2026-02-01T00:00:00.000Z' });
      expect(res.body.error.message).toMatch(/^Department budget exceeded/);
      expect(res.body.error.message).toContain('2026-02-01T00:00:00.000Z');
    }
    expect(gw.stub.hits).toBe(0);
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(0n);

    // Room on both: served, and both budgets carry the same charge as the ledger.
    await gw.admin.put(`/admin/budgets/departments/${t.departmentId}`, { limit_usd: 10, period: 'monthly' });
    const ok = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
    expect(ok.status).toBe(200);
    const user = await storedBudget(gw, 'user', t.userId);
    const department = await storedBudget(gw, 'department', t.departmentId);
    expect(user.spent).toBeGreaterThan(0n);
    expect(department.spent).toBe(user.spent);
    expect(department.spent).toBe(await ledgerSum(gw, 'department', t.departmentId, department.periodStart));
  });

  it('rolls a daily budget over at midnight UTC, and a weekly one on Monday', async () => {
    gw.stub.configure({ completionTokens: MAX_TOKENS });
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'daily' });
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    const refused = await t.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
    expect(refused.status).toBe(402);
    expect(refused.body.error.resets_at).toBe('2026-01-08T00:00:00.000Z');
    const yesterday = await storedBudget(gw, 'user', t.userId);

    clock.set('2026-01-08T00:00:00.000Z');
    const view = await gw.admin.get<{ spent_usd: number; period_start: string; resets_at: string }>(`/admin/budgets/users/${t.userId}`);
    expect(view.body).toMatchObject({ spent_usd: 0, period_start: '2026-01-08T00:00:00.000Z', resets_at: '2026-01-09T00:00:00.000Z' });
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    const today = await storedBudget(gw, 'user', t.userId);
    expect(today.periodStart.toISOString()).toBe('2026-01-08T00:00:00.000Z');
    expect(today.spent).toBe(await ledgerSum(gw, 'user', t.userId, today.periodStart));
    expect(today.spent).toBeGreaterThan(0n);
    // Yesterday's charge stays in the ledger but no longer counts.
    expect(await ledgerSum(gw, 'user', t.userId)).toBe(yesterday.spent + today.spent);

    // Weekly: Wednesday's week began on Monday 2026-01-05 and ends Monday 2026-01-12.
    clock.set(WEDNESDAY_NOON);
    const w = await gw.tenants.create({ userBudgetUsd: formatUsd(worst / 2n), period: 'weekly' });
    const weekly = await w.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
    expect(weekly.body.error.resets_at).toBe('2026-01-12T00:00:00.000Z');
    const weeklyView = await gw.admin.get<{ period_start: string }>(`/admin/budgets/users/${w.userId}`);
    expect(weeklyView.body.period_start).toBe('2026-01-05T00:00:00.000Z');
  });

  it('charges a stream cut mid-way for what it produced, and releases the rest', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'daily' });
    gw.stub.configure({ cutAfterChunks: 3 });
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify({ ...REQUEST, stream: true, messages: [{ role: 'user', content: 'tell me a long story about queues' }] }),
    });
    expect(res.status).toBe(200);
    await res.text();

    const [row] = await pollUntil(async () => {
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows).toHaveLength(1);
      return rows;
    });
    expect(row).toMatchObject({ model: MODEL, cost_source: 'estimate', status: 200, door: 'chat' });
    expect(row?.outcome).not.toBe('ok');
    expect(BigInt(row?.cost_nanos ?? 0)).toBeGreaterThan(0n);
    const budget = await storedBudget(gw, 'user', t.userId);
    expect(budget.reserved).toBe(0n);
    expect(budget.spent).toBe(BigInt(row?.cost_nanos ?? -1));
  });

  it('charges a complete stream at the cost the upstream reported in its final chunk', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'daily' });
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify({ ...REQUEST, stream: true }),
    });
    expect(res.status).toBe(200);
    await res.text();
    const [row] = await pollUntil(async () => {
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows).toHaveLength(1);
      return rows;
    });
    expect(row).toMatchObject({ cost_source: 'upstream', outcome: 'ok' });
    expect(BigInt(row?.cost_nanos ?? 0)).toBe(parseUsd(stubCost(MODEL, row?.prompt_tokens ?? 0, row?.completion_tokens ?? 0)));
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n);
  });

  it('sweeps a reservation orphaned by a crashed instance once it is older than the request deadline', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 2, period: 'daily' });
    const ds = dataSourceOf(gw);
    const sweeper = gw.gateway.app.get(BudgetSweeper);
    const now = clock.nowMs();
    // What a dead instance leaves: money held on both budgets and its reservation row.
    await ds.query(`UPDATE budgets SET reserved_nanos = reserved_nanos + 12345 + 777 WHERE scope_id IN ($1, $2)`, [t.userId, t.departmentId]);
    const insert = `INSERT INTO budget_reservations (id, request_id, user_id, department_id, user_nanos, department_nanos, created_at) VALUES ($1, $2, $3, $4, $5, $5, $6)`;
    await ds.query(insert, [randomUUID(), 'crashed-long-ago', t.userId, t.departmentId, '12345', new Date(now - 11 * 60_000).toISOString()]);
    await ds.query(insert, [randomUUID(), 'still-running', t.userId, t.departmentId, '777', new Date(now - 60_000).toISOString()]);

    expect(await sweeper.sweep()).toBeGreaterThanOrEqual(1);
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(777n);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(777n);
    const left = await ds.query<Array<{ request_id: string }>>(`SELECT request_id FROM budget_reservations WHERE user_id = $1`, [t.userId]);
    expect(left.map((r) => r.request_id)).toEqual(['still-running']);

    // The same through the service: a reservation whose instance never settled it…
    const budget = gw.gateway.app.get(BudgetService);
    const call = { principal: principalOf(t), requestId: 'crash-me', door: 'chat', body: BODY };
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const reservation = await budget.reserve(call, route);
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(777n + reservation.amountNanos);
    clock.advance(11 * 60_000);
    await sweeper.sweep();
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n);
    // …and a settle arriving after the sweep charges the cost without releasing twice.
    const usage = { prompt_tokens: 1, completion_tokens: 10, total_tokens: 11, cost: 0.000001 };
    const cost = await budget.settle(reservation, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }]);
    expect(cost).toBe(1000n);
    const after = await storedBudget(gw, 'user', t.userId);
    expect(after.reserved).toBe(0n);
    expect(after.spent).toBe(await ledgerSum(gw, 'user', t.userId, after.periodStart));
  });

  it('writes a free ledger row for a cache hit', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    await gw.gateway.app
      .get(BudgetService)
      .recordCacheHit({ principal: principalOf(t), requestId: 'cached-1', door: 'chat', body: BODY }, { ruleTaskType: 'general' }, MODEL, {
        prompt_tokens: 3,
        completion_tokens: 5,
        total_tokens: 8,
      });
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      request_id: 'cached-1',
      cost_nanos: '0',
      cost_source: 'cache',
      cache: 'hit',
      outcome: 'ok',
      prompt_tokens: 3,
      completion_tokens: 5,
    });
    expect((await storedBudget(gw, 'user', t.userId)).spent).toBe(0n);
  });
});

// Only PostgreSQL can be "unreachable" while the gateway runs; the embedded database lives in-process.
describe('budgets on postgres, database down', () => {
  let gw: TestGateway;
  const clock = new ManualClock(Date.parse(WEDNESDAY_NOON));

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres', clock });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('fails closed: with the database unreachable a request gets 503 and never reaches the upstream', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    // Authenticated once: the key stays cached (the ManualClock does not move), so only the
    // budget stage needs the database below.
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    const name = new URL(gw.database.url ?? '').pathname.slice(1);
    const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
    await admin.connect();
    try {
      await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS false`);
      await admin.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, [name]);
      const hits = gw.stub.hits;
      const res = await t.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
      expect(res.status).toBe(503);
      expect(res.body.error).toMatchObject({ code: 'unavailable', type: 'overloaded_error' });
      expect(res.body.error.message).toMatch(/budget/i);
      expect(gw.stub.hits).toBe(hits);
    } finally {
      await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS true`);
      await admin.end();
    }
    await pollUntil(async () => expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200), 10_000, 100);
  });
});
