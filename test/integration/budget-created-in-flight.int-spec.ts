import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import type { Reservation } from '../../src/budget/budget.types.js';
import { DB_KINDS } from '../support/databases.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { BODY, FRESH, heldRows, ledgerSum, MAX_TOKENS, MODEL, principalOf, REQUEST, storedBudget, worstCaseNanos } from './budget-support.js';

// A budget set on a user or department that has calls in flight (admitted while the scope had no
// budget) must count them: they hold their worst case on the new budget until they settle, so it
// admits no more on top of them than its limit allows, and their cost still lands in `spent`
// (spent == Σ ledger for the period). Calls in flight are reservations taken through the service,
// as the pipeline takes them, and settled once the budget is set.

interface BudgetView {
  limit_usd: number | null;
  spent_usd: number | null;
  reserved_usd: number | null;
}

const LEASES = { on: {}, off: { BUDGET_LEASE_MS: '0' } } as const;

describe.each(DB_KINDS.flatMap((db) => (['on', 'off'] as const).map((leases) => [db, leases] as const)))(
  'a budget created while calls are in flight, on %s with leases %s',
  (db, leases) => {
    let gw: TestGateway;
    let budget: BudgetService;
    let worst: bigint;
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };

    beforeAll(async () => {
      gw = await startTestGateway({ db, env: LEASES[leases] });
      budget = gw.gateway.app.get(BudgetService);
      worst = worstCaseNanos(gw, BODY, [MODEL], MAX_TOKENS);
    });
    afterAll(async () => {
      await gw?.close();
    });
    beforeEach(() => {
      gw.stub.reset();
      // Every answer uses its whole cap: each costs nearly its worst case.
      gw.stub.configure({ completionTokens: MAX_TOKENS });
    });

    /** Calls admitted now, in one event-loop turn (one batch statement with leases off). */
    function admit(t: Tenant, count: number): Promise<Reservation[]> {
      const principal = principalOf(t);
      return Promise.all(Array.from({ length: count }, (_, i) => budget.reserve({ principal, requestId: `in-flight-${i}`, door: 'chat', body: BODY }, route)));
    }

    /** The calls end, each charged what the upstream reported (just under its worst case). */
    function finish(calls: Reservation[]): void {
      const usage = { prompt_tokens: 10, completion_tokens: MAX_TOKENS, total_tokens: 10 + MAX_TOKENS, cost: Number(formatUsd(worst - 1000n)) };
      for (const call of calls) budget.settle(call, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }]);
    }

    it('holds their worst cases on a new user budget, admits only what is left, and charges them when they end', async () => {
      const t = await gw.tenants.create();
      const calls = await admit(t, 3);
      const limit = worst * 4n;

      const put = await gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: formatUsd(limit), period: 'total' });
      expect(put.status).toBe(200);
      expect(put.body).toMatchObject({ spent_usd: 0, reserved_usd: Number(formatUsd(worst * 3n)) });
      // Room for one more worst case, not two.
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(402);

      finish(calls);
      const view = (await gw.admin.get<BudgetView>(`/admin/budgets/users/${t.userId}`)).body;
      expect(view.reserved_usd).toBe(0);
      expect(view.spent_usd).toBeLessThanOrEqual(view.limit_usd ?? -1);
      const stored = await storedBudget(gw, 'user', t.userId);
      expect(stored.spent).toBe(await ledgerSum(gw, 'user', t.userId, stored.periodStart));
      expect(stored.spent).toBeGreaterThan(worst * 3n);
      expect(await heldRows(gw, t.userId)).toEqual([]);
    });

    it('holds them on a new department budget where only the user had one', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'total' });
      const calls = await admit(t, 2);

      const put = await gw.admin.put<BudgetView>(`/admin/budgets/departments/${t.departmentId}`, { limit_usd: formatUsd(worst * 2n), period: 'total' });
      expect(put.body).toMatchObject({ spent_usd: 0, reserved_usd: Number(formatUsd(worst * 2n)) });
      const refused = await t.api.post<{ error: { code: string; param: string } }>('/v1/chat/completions', REQUEST, FRESH);
      expect(refused.status).toBe(402);
      expect(refused.body.error.param).toBe('department');

      finish(calls);
      const department = await storedBudget(gw, 'department', t.departmentId);
      expect(department.reserved).toBe(0n);
      expect(department.spent).toBe(await ledgerSum(gw, 'department', t.departmentId, department.periodStart));
      expect(department.spent).toBeLessThanOrEqual(department.limit);
    });
  },
);
