import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ApiClient, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { BODY, costHeader, dataSourceOf, flushBudgets, FRESH, heldRows, ledgerSum, MAX_TOKENS, MODEL, principalOf, REQUEST, storedBudget, worstCaseNanos } from './budget-support.js';

// Two gateway instances on one PostgreSQL database, like two replicas behind a load balancer:
// the budget lives in the database, so together they still cannot overspend it.


describe('budgets across two instances sharing one PostgreSQL', () => {
  let first: TestGateway;
  let second: TestGateway;

  beforeAll(async () => {
    first = await startTestGateway({ db: 'postgres' });
    second = await startTestGateway({ db: 'postgres', postgresUrl: first.database.url, stub: first.stub, adminKey: first.adminKey });
  });
  afterAll(async () => {
    await second?.close();
    await first?.close();
  });

  it('serves at most what the budget covers when 50 requests race across both instances', async () => {
    first.stub.configure({ completionTokens: MAX_TOKENS });
    const worst = worstCaseNanos(first, BODY, [MODEL], MAX_TOKENS);
    const limit = (worst * 11n) / 2n; // room for 5 worst cases, not 6
    const t = await first.tenants.create({ userBudgetUsd: formatUsd(limit), departmentBudgetUsd: formatUsd(limit * 2n), period: 'total' });
    const viaFirst = t.api;
    const viaSecond = new ApiClient(second.url, t.key);

    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        (i % 2 === 0 ? viaFirst : viaSecond).post('/v1/chat/completions', { ...BODY, model: MODEL, max_tokens: MAX_TOKENS }, FRESH),
      ),
    );

    const served = results.filter((r) => r.status === 200).length;
    const servedBySecond = results.filter((r, i) => i % 2 === 1 && r.status === 200).length;
    expect(served).toBe(5);
    expect(results.filter((r) => r.status === 402)).toHaveLength(45);
    expect(first.stub.hits).toBe(5);
    // Each instance stores its own settles within BUDGET_FLUSH_MS: read once both have.
    const { user, department } = await pollUntil(async () => {
      const stored = {
        user: await storedBudget(first, 'user', t.userId, { flush: false }),
        department: await storedBudget(first, 'department', t.departmentId, { flush: false }),
      };
      expect(stored.user.reserved).toBe(0n);
      expect(stored.department.reserved).toBe(0n);
      return stored;
    });
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.spent).toBe(await ledgerSum(first, 'user', t.userId, user.periodStart, { flush: false }));
    expect(department.spent).toBe(user.spent);
    // Both instances see the same budget.
    const seen = await Promise.all([
      first.admin.get<{ spent_usd: number }>(`/admin/budgets/users/${t.userId}`),
      second.admin.get<{ spent_usd: number }>(`/admin/budgets/users/${t.userId}`),
    ]);
    expect(seen[0].body.spent_usd).toBe(seen[1].body.spent_usd);

    console.info(
      `[budget concurrency] two instances on postgres: fired 50 (25 each), served ${served} (${servedBySecond} by the second), spent $${formatUsd(user.spent)} of limit $${formatUsd(user.limit)} (worst case per request $${formatUsd(worst)})`,
    );
  });

  it('cannot overspend when both instances hold leases: 100 requests for 40 worst cases, spread over both', async () => {
    first.stub.reset();
    first.stub.configure({ completionTokens: MAX_TOKENS });
    const worst = worstCaseNanos(first, BODY, [MODEL], MAX_TOKENS);
    const limit = (worst * 81n) / 2n;
    const t = await first.tenants.create({ userBudgetUsd: formatUsd(limit), departmentBudgetUsd: 1000, period: 'total' });
    const viaSecond = new ApiClient(second.url, t.key);
    const results = await Promise.all(
      Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? t.api : viaSecond).post('/v1/chat/completions', REQUEST, FRESH)),
    );
    const served = results.filter((r) => r.status === 200);
    expect(served.length + results.filter((r) => r.status === 402).length).toBe(100);
    expect(first.stub.hits).toBe(served.length);
    await flushBudgets(second);
    const user = await storedBudget(first, 'user', t.userId);
    expect(user.spent).toBeLessThanOrEqual(limit);
    expect(user.spent).toBe(served.reduce((sum, r) => sum + costHeader(r), 0n));
    expect(user.spent).toBe(await ledgerSum(first, 'user', t.userId, user.periodStart));
    expect(user.reserved).toBe(0n);
    console.info(`[budget leases] two instances: 100 racing for 40 worst cases, served ${served.length}, spent $${formatUsd(user.spent)} of $${formatUsd(limit)}`);
  });

  it("keeps counting another instance's lease when a budget is removed and set again", async () => {
    const t = await first.tenants.create({ userBudgetUsd: 1, period: 'total' });
    const viaSecond = new ApiClient(second.url, t.key);
    expect((await viaSecond.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    const [lease] = await heldRows(first, t.userId);
    expect(lease?.request_id).toBe('budget-lease');
    expect((await first.admin.delete(`/admin/budgets/users/${t.userId}`)).status).toBe(200);
    expect((await first.admin.put(`/admin/budgets/users/${t.userId}`, { limit_usd: 1, period: 'total' })).status).toBe(200);
    // The second instance's lease still holds money on this user: the new budget counts it, and
    // keeps counting exactly what it holds while the second instance's writer shrinks it.
    for (let i = 0; i < 5; i += 1) {
      const [both] = await dataSourceOf(first).query<Array<{ reserved: string; held: string }>>(
        `SELECT b.reserved_nanos::text AS reserved, (SELECT COALESCE(sum(user_nanos), 0) FROM budget_reservations WHERE user_id = $1)::text AS held
           FROM budgets b WHERE b.scope = 'user' AND b.scope_id = $1`,
        [t.userId],
      );
      expect(both?.held).not.toBe('0');
      expect(both?.reserved).toBe(both?.held);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    // Once it is given back, nothing is left reserved and spent is what the ledger holds.
    await flushBudgets(second);
    const user = await storedBudget(first, 'user', t.userId, { flush: false });
    expect(user.reserved).toBe(0n);
    expect(await heldRows(first, t.userId)).toEqual([]);
  });

  it("counts another instance's call in flight, and its lease, in a budget created for a scope that had none", async () => {
    const worst = worstCaseNanos(first, BODY, [MODEL], MAX_TOKENS);
    const t = await first.tenants.create();
    const elsewhere = second.gateway.app.get(BudgetService);
    const principal = principalOf(t);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const call = await elsewhere.reserve({ principal, requestId: 'in-flight-elsewhere', door: 'chat', body: BODY }, route);
    const [lease] = await heldRows(first, t.userId);
    expect(lease?.request_id).toBe('budget-lease');

    // The second instance's lease may serve the user until it expires: the new budget holds all
    // of it, so it admits nothing on top until that lease is given back.
    const put = await first.admin.put<{ reserved_usd: number }>(`/admin/budgets/users/${t.userId}`, { limit_usd: formatUsd(worst * 2n), period: 'total' });
    expect(put.body.reserved_usd).toBe(Number(formatUsd(BigInt(lease?.user_nanos ?? -1))));
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(402);

    const usage = { prompt_tokens: 10, completion_tokens: MAX_TOKENS, total_tokens: 10 + MAX_TOKENS, cost: Number(formatUsd(worst - 1000n)) };
    elsewhere.settle(call, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }]);
    await flushBudgets(second);
    const user = await storedBudget(first, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(worst - 1000n);
    expect(user.spent).toBe(await ledgerSum(first, 'user', t.userId, user.periodStart));
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
  });

  it('gives its leases back when it shuts down', async () => {
    const third = await startTestGateway({ db: 'postgres', postgresUrl: first.database.url, stub: first.stub, adminKey: first.adminKey });
    const t = await first.tenants.create({ userBudgetUsd: 1, period: 'total' });
    const viaThird = new ApiClient(third.url, t.key);
    for (let i = 0; i < 3; i += 1) expect((await viaThird.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    expect(await heldRows(first, t.userId)).toHaveLength(1);
    await third.close();
    expect(await heldRows(first, t.userId)).toEqual([]);
    const user = await storedBudget(first, 'user', t.userId, { flush: false });
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(await ledgerSum(first, 'user', t.userId, user.periodStart, { flush: false }));
  });
});
