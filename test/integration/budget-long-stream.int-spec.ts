import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { BODY, dataSourceOf, FRESH, heldRows, ledgerSum, MAX_TOKENS, MODEL, principalOf, REQUEST, storedBudget, worstCaseNanos } from './budget-support.js';

// A stream has no total time limit once its first event is out, while the sweeper releases
// reservations older than BUDGET_RESERVATION_TTL_MS. Every instance renews the reservation rows
// it still holds (BudgetService.renewHeld, one statement per interval), so a live call keeps its
// money held however long it runs, and only the rows of an instance that stopped renewing them
// (a dead one) are swept.

/** Short enough to outlive in a test: must exceed UPSTREAM_DEADLINE_MS + BUDGET_LEASE_MS (1000 + 1000). */
const TTL_MS = 3500;
/** ~100 frames 100 ms apart: the stream runs ~10 s, far past TTL_MS. */
const CHUNK_DELAY_MS = 100;
const STREAM_TOKENS = MAX_TOKENS;

describe.each(DB_KINDS)('budget reservations of long calls on %s', (db) => {
  let gw: TestGateway;
  let worst: bigint;

  beforeAll(async () => {
    gw = await startTestGateway({
      db,
      env: {
        BUDGET_RESERVATION_TTL_MS: String(TTL_MS),
        BUDGET_SWEEP_INTERVAL_MS: '200',
        UPSTREAM_DEADLINE_MS: '1000',
        BUDGET_LEASE_MS: '1000',
      },
    });
    worst = worstCaseNanos(gw, BODY, [MODEL], MAX_TOKENS);
    gw.stub.configure({ chunkDelayMs: CHUNK_DELAY_MS, completionTokens: STREAM_TOKENS });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('keeps a live stream’s reservation (exact and lease) past the TTL while a dead instance’s is swept', async () => {
    // Room for 32 worst cases: the stream draws on a lease (a `budget-lease` row).
    const leased = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1, period: 'daily' });
    // Room for 3 worst cases only: no lease fits, the stream reserves exactly.
    const exact = await gw.tenants.create({ userBudgetUsd: formatUsd(worst * 3n), departmentBudgetUsd: 1, period: 'daily' });
    const ds = dataSourceOf(gw);

    const started = Date.now();
    const finished = new Set<string>();
    const stream = (t: typeof leased, name: string) =>
      t.api.post<string>('/v1/chat/completions', { ...REQUEST, stream: true }, FRESH).then((res) => {
        finished.add(name);
        return res;
      });
    const streams = [stream(leased, 'leased'), stream(exact, 'exact')];

    // Both calls hold their worst case in the database.
    await pollUntil(async () => {
      expect((await heldRows(gw, leased.userId)).map((r) => r.request_id)).toEqual(['budget-lease']);
      expect(await heldRows(gw, exact.userId)).toHaveLength(1);
    });
    const [liveExact] = await heldRows(gw, exact.userId);
    expect(liveExact?.request_id).not.toBe('budget-lease');

    // What an instance that died mid-call leaves behind: its hold on the budget and its row,
    // taken after the live ones (so by the time it is old enough to sweep, so are they).
    const deadNanos = 4321n;
    await ds.query(`UPDATE budgets SET reserved_nanos = reserved_nanos + $2 WHERE scope = 'user' AND scope_id = $1`, [exact.userId, String(deadNanos)]);
    await ds.query(
      `INSERT INTO budget_reservations (id, request_id, user_id, department_id, user_nanos, department_nanos, created_at) VALUES ($1, 'dead-instance', $2, $3, $4, 0, $5)`,
      [randomUUID(), exact.userId, exact.departmentId, String(deadNanos), new Date().toISOString()],
    );
    expect((await storedBudget(gw, 'user', exact.userId, { flush: false })).reserved).toBe(worst + deadNanos);

    // The sweeper (every 200 ms) takes the dead row once it is TTL_MS old…
    await pollUntil(async () => {
      expect((await heldRows(gw, exact.userId)).map((r) => r.request_id)).not.toContain('dead-instance');
    }, TTL_MS + 3000);
    // …while both live calls, older still and not finished, keep theirs and the money they hold.
    expect(Date.now() - started).toBeGreaterThan(TTL_MS);
    expect(finished.size).toBe(0);
    const exactRows = await heldRows(gw, exact.userId);
    expect(exactRows).toEqual([{ request_id: liveExact?.request_id, user_nanos: String(worst), department_nanos: String(worst) }]);
    expect((await storedBudget(gw, 'user', exact.userId, { flush: false })).reserved).toBe(worst);
    // The lease expired after BUDGET_LEASE_MS and was shrunk to what its draw in flight may cost; its row stays.
    await pollUntil(async () => {
      expect(await heldRows(gw, leased.userId)).toEqual([{ request_id: 'budget-lease', user_nanos: String(worst), department_nanos: String(worst) }]);
      expect((await storedBudget(gw, 'user', leased.userId, { flush: false })).reserved).toBe(worst);
    });

    // Another TTL later, still held: renewal goes on for as long as the call runs.
    const swept = Date.now();
    await new Promise((r) => setTimeout(r, Math.min(TTL_MS, 9000 - (swept - started))));
    expect(finished.size).toBe(0);
    expect(await heldRows(gw, exact.userId)).toHaveLength(1);
    expect(await heldRows(gw, leased.userId)).toHaveLength(1);

    // The streams end normally; settling releases the holds and charges what they cost.
    for (const res of await Promise.all(streams)) {
      expect(res.status).toBe(200);
      expect(res.body).toContain('data: [DONE]');
    }
    expect(Date.now() - started).toBeGreaterThan(2 * TTL_MS);
    await gw.gateway.app.get(BudgetService).flush();
    for (const t of [leased, exact]) {
      await pollUntil(async () => expect(await heldRows(gw, t.userId)).toEqual([]));
      const budget = await storedBudget(gw, 'user', t.userId);
      expect(budget.reserved).toBe(0n);
      expect(budget.spent).toBeGreaterThan(0n);
      expect(budget.spent).toBe(await ledgerSum(gw, 'user', t.userId, budget.periodStart));
    }
  });

  it('renews every live row of the instance in one statement, and none once they are settled', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worst * 3n), departmentBudgetUsd: 1, period: 'daily' });
    const budget = gw.gateway.app.get(BudgetService);
    const principal = principalOf(t);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const a = await budget.reserve({ principal, requestId: 'renew-a', door: 'chat', body: BODY }, route);
    const b = await budget.reserve({ principal, requestId: 'renew-b', door: 'chat', body: BODY }, route);
    expect([a.held, b.held]).toEqual([true, true]);
    const ds = dataSourceOf(gw);
    const old = new Date(Date.now() - 60_000).toISOString();
    await ds.query(`UPDATE budget_reservations SET created_at = $2 WHERE user_id = $1`, [t.userId, old]);

    // (A renewal of the instance's own timer may be in flight with the old times: ask again then.)
    await pollUntil(async () => {
      expect(await budget.renewHeld()).toBeGreaterThanOrEqual(2);
      const rows = await ds.query<Array<{ created_at: Date }>>(`SELECT created_at FROM budget_reservations WHERE user_id = $1`, [t.userId]);
      expect(rows).toHaveLength(2);
      for (const row of rows) expect(Date.now() - new Date(row.created_at).getTime()).toBeLessThan(5000);
    });

    expect([budget.renews(a), budget.renews(b)]).toEqual([true, true]);
    const usage = { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 };
    for (const r of [a, b]) budget.settle(r, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }]);
    await budget.flush();
    expect(await heldRows(gw, t.userId)).toEqual([]);
    // Settled: no longer renewed (the rows are gone, so renewing them would not show in the table).
    expect([budget.renews(a), budget.renews(b)]).toEqual([false, false]);
  });
});
