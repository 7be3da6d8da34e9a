import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { formatUsd, parseUsd } from '../../libs/money/src/index.js';
import { stubCost } from '../../libs/stub-upstream/src/index.js';
import { type BudgetStatement, BudgetDatabase } from '../../src/budget/budget-database.js';
import { FLUSH_SQL, RESERVE_SQL } from '../../src/budget/budget-sql.js';
import { BudgetSweeper } from '../../src/budget/budget-sweeper.service.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ManualClock } from '../../src/core/clock.js';
import type { Principal } from '../../src/identity/principal.js';
import { DB_KINDS, PG_ADMIN_URL } from '../support/databases.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import type { TcpProxy } from '../support/redis.js';
import {
  BODY,
  costHeader,
  dataSourceOf,
  flushBudgets,
  FRESH,
  ledgerRows,
  ledgerSum,
  MAX_TOKENS,
  MODEL,
  REQUEST,
  storedBudget,
  WEDNESDAY_NOON,
  worstCaseNanos,
} from './budget-support.js';

// Reservation, settlement, rollover and the sweeper against each real database, through the
// real HTTP gateway and the stub upstream. Time is a ManualClock: the SQL takes "now" from it.
// Settles are stored by the batch writer after the response: the budget-support readers store
// this instance's queued ones first, as the budget views do.
//
// These suites pin the exact reservation (one statement per request), which is what every
// request makes near its limit and with BUDGET_LEASE_MS=0: leases are off here (EXACT) and are
// tested on their own in budget-leases.int-spec.ts.
const EXACT = { BUDGET_LEASE_MS: '0' };


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
    gw = await startTestGateway({ db, clock, env: EXACT });
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

    // Reservations made in one event-loop turn leave together: one statement for all 200.
    const database = gw.gateway.app.get(BudgetDatabase);
    const sent = vi.spyOn(database, 'hold');
    const outcomes = await Promise.allSettled(Array.from({ length: 200 }, (_, i) => budget.reserve(call(i), route)));
    expect(sent.mock.calls.map(([statement]) => statement.name)).toEqual(['gatehouse_budget_reserve_batch']);
    sent.mockRestore();

    const granted = outcomes.filter((o) => o.status === 'fulfilled');
    expect(granted).toHaveLength(3);
    for (const o of outcomes) {
      if (o.status === 'rejected') expect(o.reason).toMatchObject({ code: 'budget_exceeded', param: 'department' });
    }
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(3n * worst);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(3n * worst);

    // Releasing them (failed attempts, no usage) gives everything back and charges nothing.
    for (const o of granted) budget.settle(o.value, [{ model: MODEL, ok: false, status: 503, failure: 'http', usage: undefined }]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(0n);
    expect((await storedBudget(gw, 'department', t.departmentId)).reserved).toBe(0n);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows).toHaveLength(3);
    expect(rows.every((r) => r.cost_nanos === '0' && r.cost_source === 'none' && r.outcome === 'http' && r.status === 503)).toBe(true);
  });

  it('stores the settles of 40 parallel requests off the request path, in batches on its own timer: spent == Σ ledger, nothing left reserved', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1, period: 'daily' });
    const results = await Promise.all(Array.from({ length: 40 }, () => t.api.post('/v1/chat/completions', REQUEST, FRESH)));
    expect(results.map((r) => r.status)).toEqual(Array(40).fill(200));
    const charged = results.reduce((sum, r) => sum + (parseUsd(r.headers.get('x-gateway-cost-usd') ?? 'x') ?? -1n), 0n);
    expect(charged).toBeGreaterThan(0n);

    // Nothing asks for a flush here: the writer's timer (BUDGET_FLUSH_MS) stores them by itself.
    const user = await pollUntil(async () => {
      const stored = await storedBudget(gw, 'user', t.userId, { flush: false });
      expect(stored.reserved).toBe(0n);
      expect(stored.spent).toBe(charged);
      return stored;
    });
    expect(await storedBudget(gw, 'department', t.departmentId, { flush: false })).toMatchObject({ spent: charged, reserved: 0n });
    expect(await ledgerSum(gw, 'user', t.userId, user.periodStart, { flush: false })).toBe(charged);
    const rows = await ledgerRows(gw, 'user', t.userId, { flush: false });
    expect(rows).toHaveLength(40);
    expect(new Set(rows.map((r) => r.charge_id)).size).toBe(40);
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

  it('rolls the period over in a batch of reservations too: after midnight yesterday no longer counts', async () => {
    gw.stub.configure({ completionTokens: MAX_TOKENS });
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'daily' });
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    const budget = gw.gateway.app.get(BudgetService);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const call = (i: number) => ({ principal: principalOf(t), requestId: `midnight-${i}`, door: 'chat', body: BODY });
    // Still yesterday: what is spent leaves no room for a worst case.
    const before = await Promise.allSettled([0, 1, 2].map((i) => budget.reserve(call(i), route)));
    expect(before.map((o) => o.status)).toEqual(['rejected', 'rejected', 'rejected']);

    clock.set('2026-01-08T00:00:00.000Z');
    const database = gw.gateway.app.get(BudgetDatabase);
    const sent = vi.spyOn(database, 'hold');
    const after = await Promise.allSettled([3, 4, 5].map((i) => budget.reserve(call(i), route)));
    expect(sent.mock.calls.map(([statement]) => statement.name)).toEqual(['gatehouse_budget_reserve_batch']);
    sent.mockRestore();
    // A new day: 1.5 worst cases of room, so exactly one of the three fits.
    expect(after.map((o) => o.status)).toEqual(['fulfilled', 'rejected', 'rejected']);
    const today = await storedBudget(gw, 'user', t.userId, { flush: false });
    expect(today).toMatchObject({ spent: 0n, reserved: worst });
    expect(today.periodStart.toISOString()).toBe('2026-01-08T00:00:00.000Z');
    for (const o of after) if (o.status === 'fulfilled') budget.settle(o.value, [{ model: MODEL, ok: false, status: 503, failure: 'http', usage: undefined }]);
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

  // gpt-4o-mini bills an image as 2,833 + 5,667 tokens per 512 px tile (up to 48,169): a flat
  // allowance of 1,500 tokens let a request of ten images be admitted by a budget it then
  // overspent many times over. Its published per-image price is the worst case now.
  it('holds each image at the model\'s per-image price, so a budget that covers only its tokens refuses the request', async () => {
    const image = { type: 'image_url', image_url: { url: 'https://example.com/cat.png', detail: 'high' } };
    const body = { ...REQUEST, messages: [{ role: 'user', content: [{ type: 'text', text: 'what is in these?' }, ...Array.from({ length: 10 }, () => image)] }] };
    const worst = worstCaseNanos(gw, body as unknown as typeof BODY, [MODEL], MAX_TOKENS);
    // $0.007225 per image (static-prices.json), ten of them, above the rest of the estimate.
    expect(worst).toBeGreaterThan(10n * 7_225_000n);
    const tokensOnly = worstCaseNanos(gw, { messages: [{ role: 'user', content: 'x'.repeat(3 * 15_000) }] }, [MODEL], MAX_TOKENS);
    expect(worst).toBeGreaterThan(tokensOnly);
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(tokensOnly), period: 'total' });
    const refused = await t.api.post<{ error: { code: string; param: string } }>('/v1/chat/completions', body, FRESH);
    expect(refused).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'user' } } });
    expect(gw.stub.hits).toBe(0);
    const covered = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    expect((await covered.api.post('/v1/chat/completions', body, FRESH)).status).toBe(200);
  });

  it('charges a stream cut before its usage at most what it was allowed to produce: its budget is not overspent', async () => {
    // Every token the cap allows is sent, in long words (chars ÷ 3 would count ~14 tokens a word),
    // then the stream is cut before the usage chunk. The budget covers exactly this one call.
    const body = { ...REQUEST, stream: true, messages: [{ role: 'user', content: 'write a long story' }] };
    const limit = worstCaseNanos(gw, body, [MODEL], MAX_TOKENS);
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(limit), period: 'total' });
    gw.stub.configure({ completionTokens: MAX_TOKENS, wordBytes: 40, cutAfterChunks: MAX_TOKENS + 1 });
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify(body),
    });
    expect(res.status).toBe(200);
    expect((await res.text()).length).toBeGreaterThan(MAX_TOKENS * 40);

    const [row] = await ledgerRows(gw, 'user', t.userId);
    expect(row).toMatchObject({ cost_source: 'estimate', completion_tokens: MAX_TOKENS });
    expect(BigInt(row?.cost_nanos ?? -1)).toBeLessThanOrEqual(limit);
    const view = await gw.admin.get<{ limit_usd: number; spent_usd: number; reserved_usd: number }>(`/admin/budgets/users/${t.userId}`);
    expect(view.body.reserved_usd).toBe(0);
    expect(view.body.spent_usd).toBeLessThanOrEqual(view.body.limit_usd);
    expect(view.body.spent_usd).toBe(Number(formatUsd(BigInt(row?.cost_nanos ?? -1))));
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
    const { costNanos: cost } = budget.settle(reservation, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }]);
    expect(cost).toBe(1000n);
    const after = await storedBudget(gw, 'user', t.userId);
    expect(after.reserved).toBe(0n);
    expect(after.spent).toBe(await ledgerSum(gw, 'user', t.userId, after.periodStart));
  });

  it('counts cache hits into free ledger rows, one per key, model, task type, door and second, and reports every hit as a request', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const call = (requestId: string, door = 'chat') => ({ principal: principalOf(t), requestId, door, body: BODY });
    const general = { ruleTaskType: 'general' };
    budget.recordCacheHit(call('cached-1'), general, MODEL, { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 });
    // The same request id again (a caller reusing x-request-id) is one more hit, not a duplicate.
    budget.recordCacheHit(call('cached-1'), general, MODEL);
    budget.recordCacheHit(call('cached-2'), general, MODEL, { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 });
    budget.recordCacheHit(call('other-model'), general, 'anthropic/claude-3.5-haiku', { prompt_tokens: 7, completion_tokens: 7, total_tokens: 14 });
    budget.recordCacheHit(call('other-door', 'complete'), general, MODEL);
    budget.recordCacheHit(call('other-task'), { ruleTaskType: 'code' }, MODEL);
    clock.advance(1000);
    budget.recordCacheHit(call('next-second'), general, MODEL, { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 });

    const rows = await ledgerRows(gw, 'user', t.userId);
    const summary = rows.map((r) => [r.request_id, r.model, r.door, r.task_type, r.cache_hits, r.prompt_tokens, r.completion_tokens]);
    expect(summary).toEqual([
      ['cached-1', MODEL, 'chat', 'general', 3, 4, 7],
      ['other-model', 'anthropic/claude-3.5-haiku', 'chat', 'general', 1, 7, 7],
      ['other-door', MODEL, 'complete', 'general', 1, 0, 0],
      ['other-task', MODEL, 'chat', 'code', 1, 0, 0],
      ['next-second', MODEL, 'chat', 'general', 1, 1, 1],
    ]);
    for (const row of rows) expect(row).toMatchObject({ cost_nanos: '0', cost_source: 'cache', cache: 'hit', outcome: 'ok', status: 200, key_id: t.keyId });
    expect(new Set(rows.map((r) => r.charge_id)).size).toBe(rows.length);
    expect(rows[4]?.created_at.getTime()).toBe(Date.parse(WEDNESDAY_NOON) + 1000);

    // A row the flush stored counts no more: the next hit of that second opens a row of its own.
    budget.recordCacheHit(call('after-flush'), general, MODEL);
    const later = await ledgerRows(gw, 'user', t.userId);
    expect(later.slice(0, 5)).toEqual(rows);
    expect(later[5]).toMatchObject({ request_id: 'after-flush', cache_hits: 1 });

    // The reports count every hit as a request (and an attempt), whichever row it is counted in.
    const usage = await t.api.get<{ spend: Array<{ model: string; requests: number; attempts: number; prompt_tokens: number; cost_usd: number }> }>('/v1/usage');
    expect(usage.status).toBe(200);
    expect(usage.body.spend).toEqual([
      { model: 'anthropic/claude-3.5-haiku', requests: 1, attempts: 1, prompt_tokens: 7, completion_tokens: 7, cost_usd: 0 },
      { model: MODEL, requests: 7, attempts: 7, prompt_tokens: 5, completion_tokens: 8, cost_usd: 0 },
    ]);
    expect((await storedBudget(gw, 'user', t.userId)).spent).toBe(0n);
  });
});

/**
 * Records every budget statement an instance sends, in order: reservations (the hold pool),
 * batched writes (the writer), and anything else touching the budget tables on the DataSource.
 * On PGlite the first two run on the DataSource too; they are counted once, by their own name.
 */
function recordBudgetStatements(gw: TestGateway): { statements: string[]; restore(): void } {
  const database = gw.gateway.app.get(BudgetDatabase);
  const ds = dataSourceOf(gw);
  const statements: string[] = [];
  const hold = database.hold.bind(database);
  const write = database.write.bind(database);
  const query = ds.query.bind(ds);
  const spies = [
    vi.spyOn(database, 'hold').mockImplementation((statement: BudgetStatement, params: readonly unknown[]) => {
      statements.push('reserve');
      return hold(statement, params);
    }),
    vi.spyOn(database, 'write').mockImplementation((statement: BudgetStatement, params: readonly unknown[]) => {
      statements.push('flush');
      return write(statement, params);
    }),
    vi.spyOn(ds, 'query').mockImplementation((...args: Parameters<typeof query>) => {
      const sql = args[0];
      if (sql !== RESERVE_SQL && sql !== FLUSH_SQL && /budgets|budget_reservations|usage_ledger/.test(sql)) statements.push(sql.slice(0, 40));
      // Every argument passes through: a query runner given as the third one must be kept.
      return query(...args);
    }),
  ];
  return { statements, restore: () => spies.forEach((spy) => spy.mockRestore()) };
}

// The writer's timer never fires during these tests: what is stored is what a request, a view or
// the test itself stored, so the statements each step sends are exactly countable.
describe.each(DB_KINDS)('budget writes on %s, flushed on demand only (BUDGET_FLUSH_MS=60000)', (db) => {
  let gw: TestGateway;
  let worst: bigint;

  beforeAll(async () => {
    gw = await startTestGateway({ db, env: { ...EXACT, BUDGET_FLUSH_MS: '60000' } });
    worst = worstCaseNanos(gw, BODY, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('adds ONE database round trip per request on the request path (reserve); settles and cache-hit rows are stored by one statement per batch', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const recorder = recordBudgetStatements(gw);
    const { statements } = recorder;
    try {
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(statements).toEqual(['reserve']);

      // Fallback attempts included: still one reservation, and nothing else before the answer.
      gw.stub.configure({ models: { [MODEL]: { status: 503, failTimes: 1 } } });
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(gw.stub.hits).toBeGreaterThanOrEqual(2);
      expect(statements).toEqual(['reserve', 'reserve']);

      // A cache hit: no statement at all (its free ledger row is queued like a settle).
      gw.stub.reset();
      const cacheable = { ...REQUEST, messages: [{ role: 'user', content: `cache me ${randomUUID()}` }] };
      expect((await t.api.post('/v1/chat/completions', cacheable)).status).toBe(200);
      await pollUntil(async () => {
        const before = statements.length;
        const res = await t.api.post('/v1/chat/completions', cacheable);
        expect(res.headers.get('x-gateway-cache')).toBe('hit');
        expect(statements).toHaveLength(before);
      });
      expect(statements.every((s) => s === 'reserve')).toBe(true);

      // Everything queued so far (settles with their fallback attempts, the hit) in ONE statement.
      statements.length = 0;
      await flushBudgets(gw);
      expect(statements).toEqual(['flush']);
      const user = await storedBudget(gw, 'user', t.userId);
      expect(user.reserved).toBe(0n);
      expect(user.spent).toBeGreaterThan(0n);
      expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows.filter((r) => r.cache === 'hit')).toHaveLength(1);
      expect(rows.filter((r) => r.outcome !== 'ok')).toHaveLength(1);

      // A refusal with nothing of this caller waiting to be stored: the one reservation statement.
      await gw.admin.put(`/admin/budgets/users/${t.userId}`, { limit_usd: 0, period: 'daily' });
      statements.length = 0;
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(402);
      expect(statements).toEqual(['reserve']);
    } finally {
      recorder.restore();
    }
  });

  it("does not refuse a sequential caller because of its own finished requests: a refusal stores the caller's queued settles and asks once more", async () => {
    // Each answer costs a small part of its worst case; the budget holds one and a half worst cases.
    gw.stub.configure({ completionTokens: 5 });
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'daily' });
    const recorder = recordBudgetStatements(gw);
    const results = [];
    try {
      for (let i = 0; i < 4; i += 1) results.push(await t.api.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH));
    } finally {
      recorder.restore();
    }
    expect(results.map((r) => r.status)).toEqual([200, 200, 200, 200]);
    // Each later request was refused by the unsettled hold of the one before, stored it, and got its reservation.
    expect(recorder.statements).toEqual(['reserve', 'reserve', 'flush', 'reserve', 'reserve', 'flush', 'reserve', 'reserve', 'flush', 'reserve']);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(results.reduce((sum, r) => sum + costHeader(r), 0n));
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
  });

  it('retries a failed flush without charging twice, also when the failed attempt had committed (ON CONFLICT)', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const database = gw.gateway.app.get(BudgetDatabase);
    const write = database.write.bind(database);
    const spy = vi.spyOn(database, 'write');
    try {
      const first = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
      const second = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
      // Stored and committed, but the answer never arrives (the connection dropped after COMMIT).
      spy.mockImplementationOnce(async (statement: BudgetStatement, params: readonly unknown[]) => {
        await write(statement, params);
        throw new Error('connection terminated after commit');
      });
      expect(await budget.flush()).toBe(false);
      expect(await ledgerRows(gw, 'user', t.userId, { flush: false })).toHaveLength(2);

      const third = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
      // Refused before anything was stored.
      spy.mockImplementationOnce(() => Promise.reject(new Error('connection refused')));
      expect(await budget.flush()).toBe(false);
      // The retry carries all three: the first two are already there and are neither inserted nor charged again.
      expect(await budget.flush()).toBe(true);

      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows).toHaveLength(3);
      expect(new Set(rows.map((r) => r.charge_id)).size).toBe(3);
      const paid = [first, second, third].reduce((sum, r) => sum + costHeader(r), 0n);
      for (const [scope, id] of [
        ['user', t.userId],
        ['department', t.departmentId],
      ] as const) {
        const stored = await storedBudget(gw, scope, id);
        expect(stored.reserved).toBe(0n);
        expect(stored.spent).toBe(paid);
        expect(stored.spent).toBe(await ledgerSum(gw, scope, id, stored.periodStart));
      }
    } finally {
      spy.mockRestore();
    }
  });

  it('counts no cache hit twice when a flush that committed is retried, and loses none counted meanwhile', async () => {
    const t = await gw.tenants.create();
    const budget = gw.gateway.app.get(BudgetService);
    const database = gw.gateway.app.get(BudgetDatabase);
    const write = database.write.bind(database);
    const spy = vi.spyOn(database, 'write');
    const hit = () =>
      budget.recordCacheHit({ principal: principalOf(t), requestId: randomUUID(), door: 'chat', body: BODY }, { ruleTaskType: 'general' }, MODEL, {
        prompt_tokens: 2,
        completion_tokens: 3,
        total_tokens: 5,
      });
    try {
      hit();
      hit();
      spy.mockImplementationOnce(async (statement: BudgetStatement, params: readonly unknown[]) => {
        await write(statement, params);
        throw new Error('connection terminated after commit');
      });
      expect(await budget.flush()).toBe(false);
      // Counted while the stored row waits for its retry: they must not be folded into it.
      hit();
      hit();
      hit();
      expect(await budget.flush()).toBe(true);

      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows.reduce((n, r) => n + (r.cache_hits ?? 0), 0)).toBe(5);
      expect(rows.reduce((n, r) => n + r.prompt_tokens, 0)).toBe(10);
      expect(rows.reduce((n, r) => n + r.completion_tokens, 0)).toBe(15);
    } finally {
      spy.mockRestore();
    }
  });

  it('sets aside the one charge the database rejects for its content, and stores the rest of its batch', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const call = (requestId: string) => ({ principal: principalOf(t), requestId, door: 'chat', body: BODY });
    const usage = (cost: number) => ({ prompt_tokens: 1, completion_tokens: 10, total_tokens: 11, cost });
    const good = [await budget.reserve(call('good-1'), route), await budget.reserve(call('good-2'), route)];
    const bad = await budget.reserve(call('absurd'), route);
    budget.settle(good[0], [{ model: MODEL, ok: true, status: 200, failure: undefined, usage: usage(0.000001) }]);
    // A NUL in the model name: the batch travels as jsonb, which cannot hold \u0000, so the
    // database refuses this row (as it would any row whose content it cannot store).
    budget.settle(bad, [{ model: `${MODEL}\u0000`, ok: true, status: 200, failure: undefined, usage: usage(0.000004) }]);
    budget.settle(good[1], [{ model: MODEL, ok: true, status: 200, failure: undefined, usage: usage(0.000002) }]);

    expect(await budget.flush()).toBe(true);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => r.request_id)).toEqual(['good-1', 'good-2']);
    const stored = await storedBudget(gw, 'user', t.userId);
    expect(stored.spent).toBe(3000n);
    // The rejected charge's reservation stays held until the sweeper releases it: never a free call.
    expect(stored.reserved).toBe(bad.amountNanos);
  });
});

// Only PostgreSQL has connections of its own to configure, or to lose while the gateway runs; the
// embedded database lives in-process.
describe('budgets on postgres: connections and outages', () => {
  let gw: TestGateway;
  const clock = new ManualClock(Date.parse(WEDNESDAY_NOON));

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres', clock, env: EXACT });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('commits reservations asynchronously and the money synchronously, each on its own pool', async () => {
    const database = gw.gateway.app.get(BudgetDatabase);
    const show = { name: 'test_show_synchronous_commit', text: 'SHOW synchronous_commit' };
    expect(await database.hold(show, [])).toEqual([{ synchronous_commit: 'off' }]);
    // The writer keeps whatever the server is configured for (on, remote_apply…), as the rest of the gateway does.
    const configured = await dataSourceOf(gw).query<Array<{ synchronous_commit: string }>>('SHOW synchronous_commit');
    expect(configured[0]?.synchronous_commit).not.toBe('off');
    expect(await database.write(show, [])).toEqual(configured);
  });

  it('fails closed: with the database unreachable a request gets 503 and never reaches the upstream', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    // Authenticated once: the key stays cached (the ManualClock does not move), so only the
    // budget stage needs the database below.
    const served = [await t.api.post('/v1/chat/completions', REQUEST, FRESH)];
    expect(served[0]?.status).toBe(200);
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
    served.push(
      await pollUntil(
        async () => {
          const res = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
          expect(res.status).toBe(200);
          return res;
        },
        10_000,
        100,
      ),
    );
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(served.reduce((sum, r) => sum + costHeader(r), 0n));
    expect(await ledgerRows(gw, 'user', t.userId)).toHaveLength(2);
  });

  it('keeps answering while the ledger is locked, and stores the settles once it is free again, after its writer connection was killed', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const name = new URL(gw.database.url ?? '').pathname.slice(1);
    const admin = new pg.Client({ connectionString: gw.database.url });
    await admin.connect();
    const served = [];
    try {
      await admin.query('BEGIN');
      await admin.query('LOCK TABLE usage_ledger IN ACCESS EXCLUSIVE MODE');
      // The reservation does not touch the ledger; the settle waits behind the lock, off the request path.
      for (let i = 0; i < 3; i += 1) served.push(await t.api.post('/v1/chat/completions', REQUEST, FRESH));
      expect(served.map((r) => r.status)).toEqual([200, 200, 200]);
      // The writer's flush is stuck on the lock: end its connection, so that flush fails and is retried.
      const [stuck] = await pollUntil(async () => {
        const rows = (
          await admin.query<{ pid: number }>(
            `SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'gatehouse-budget-write' AND wait_event_type = 'Lock'`,
            [name],
          )
        ).rows;
        expect(rows).toHaveLength(1);
        return rows;
      });
      await admin.query('SELECT pg_terminate_backend($1)', [stuck?.pid]);
      expect((await storedBudget(gw, 'user', t.userId, { flush: false })).reserved).toBe(3n * worstCaseNanos(gw, BODY, [MODEL], MAX_TOKENS));
    } finally {
      await admin.query('ROLLBACK');
      await admin.end();
    }
    const paid = served.reduce((sum, r) => sum + costHeader(r), 0n);
    const user = await pollUntil(async () => {
      const stored = await storedBudget(gw, 'user', t.userId, { flush: false });
      expect(stored.reserved).toBe(0n);
      return stored;
    });
    expect(user.spent).toBe(paid);
    expect(await ledgerRows(gw, 'user', t.userId)).toHaveLength(3);
    expect((await storedBudget(gw, 'department', t.departmentId)).spent).toBe(paid);
  });
});

describe('budget writes on shutdown (postgres)', () => {
  it('stores every queued settle and ledger row when the gateway closes, a stream that finished during the drain included', async () => {
    // Only shutdown can store anything here: the writer's timer would take a minute.
    const gw = await startTestGateway({ db: 'postgres', env: { BUDGET_FLUSH_MS: '60000', SHUTDOWN_DRAIN_MS: '30000' } });
    try {
      const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
      const paid: bigint[] = [];
      for (let i = 0; i < 3; i += 1) {
        const res = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
        expect(res.status).toBe(200);
        paid.push(costHeader(res));
      }
      const cacheable = { ...REQUEST, messages: [{ role: 'user', content: `cache me ${randomUUID()}` }] };
      expect((await t.api.post('/v1/chat/completions', cacheable)).status).toBe(200);
      await pollUntil(async () => expect((await t.api.post('/v1/chat/completions', cacheable)).headers.get('x-gateway-cache')).toBe('hit'));
      gw.stub.configure({ chunkDelayMs: 100, completionTokens: 5 });
      const stream = await fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', ...FRESH },
        body: JSON.stringify({ ...REQUEST, stream: true, stream_options: { include_usage: true } }),
      });
      expect(stream.status).toBe(200);

      const closing = gw.gateway.close();
      const text = await stream.text();
      expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true);
      await closing;

      const client = new pg.Client({ connectionString: gw.database.url });
      await client.connect();
      try {
        const ledger = await client.query<{ cache: string | null; cost_nanos: string }>(`SELECT cache, cost_nanos FROM usage_ledger WHERE user_id = $1`, [
          t.userId,
        ]);
        // Three JSON answers, the miss that filled the cache, its hit(s), and the stream.
        expect(ledger.rows.length).toBeGreaterThanOrEqual(6);
        expect(ledger.rows.filter((r) => r.cache === 'hit').length).toBeGreaterThanOrEqual(1);
        const sum = ledger.rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n);
        const budget = await client.query<{ spent_nanos: string; reserved_nanos: string }>(
          `SELECT spent_nanos, reserved_nanos FROM budgets WHERE scope = 'user' AND scope_id = $1`,
          [t.userId],
        );
        expect(budget.rows[0]).toEqual({ spent_nanos: sum.toString(), reserved_nanos: '0' });
        expect(sum).toBeGreaterThan(paid.reduce((n, c) => n + c, 0n));
        const reservations = await client.query(`SELECT 1 FROM budget_reservations WHERE user_id = $1`, [t.userId]);
        expect(reservations.rows).toHaveLength(0);
      } finally {
        await client.end();
      }
    } finally {
      await gw.stub.close();
      await gw.database.drop();
    }
  });
});

describe('a PostgreSQL that stops answering (frozen, not gone)', () => {
  let gateways: ProxiedGateway;
  let owner: TestGateway;
  let proxy: TcpProxy;
  let gw: TestGateway;

  beforeAll(async () => {
    // The longest key cache: the cached key must still be cached when its reservation is tried.
    gateways = await startGatewayBehindPostgresProxy({ env: { DATABASE_REQUEST_TIMEOUT_MS: '300', KEY_CACHE_MS: '2000' } });
    ({ owner, proxy, gw } = gateways);
  });
  afterAll(async () => {
    await gateways?.close();
  });

  it('answers 503 within DATABASE_REQUEST_TIMEOUT_MS instead of holding requests, and serves again once it answers', async () => {
    const known = await owner.tenants.create({ userBudgetUsd: 1 });
    const unknown = await owner.tenants.create({ userBudgetUsd: 1 });
    const viaKnown = new ApiClient(gw.url, known.key);
    // Authenticated (the key is cached for KEY_CACHE_MS), but nothing reserved: the body is refused after the key check.
    expect((await viaKnown.post('/v1/chat/completions', { messages: 'not a list' })).status).toBe(400);
    const hits = owner.stub.hits;

    proxy.freeze();
    try {
      // A cached key: its budget reservation waits on the database.
      const reserve = await viaKnown.post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
      expect(reserve.status).toBe(503);
      expect(reserve.body.error.message).toMatch(/budget/i);
      // A key not cached yet: its lookup waits on the database.
      const lookup = await new ApiClient(gw.url, unknown.key).post<ErrorBody>('/v1/chat/completions', REQUEST, FRESH);
      expect(lookup.status).toBe(503);
      expect(lookup.body.error).toMatchObject({ code: 'unavailable', type: 'overloaded_error' });
      expect(lookup.body.error.message).toMatch(/API keys/);
      expect(owner.stub.hits).toBe(hits);
    } finally {
      proxy.thaw();
    }
    await pollUntil(async () => expect((await viaKnown.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200), 10_000, 100);
  });
});
