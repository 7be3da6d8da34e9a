import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetDatabase, type BudgetStatement } from '../../src/budget/budget-database.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ManualClock } from '../../src/core/clock.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import {
  BODY,
  costHeader,
  dataSourceOf,
  FRESH,
  heldRows,
  ledgerSum,
  MAX_TOKENS,
  MODEL,
  REQUEST,
  storedBudget,
  WEDNESDAY_NOON,
  worstCaseNanos,
} from './budget-support.js';

// Budget leases (src/budget/budget-leases.ts), on by default: an instance reserves many worst
// cases of a user × department pair at once and serves the pair's next requests from them
// without a database round trip, while nothing can overspend and the headroom comes back.
// Across two instances: budget-multi-instance.int-spec.ts.

/** The defaults: BUDGET_LEASE_MS=2000, BUDGET_LEASE_REQUESTS=32. */
const LEASE_MS = 2000;
const LEASE_REQUESTS = 32n;

/** gatehouse_budget_holds_total{outcome="granted"} by path, from /metrics (counters are per process: compare before and after). */
async function holdsMetric(gw: TestGateway): Promise<{ lease: number; exact: number; leaseRequest: number }> {
  const text = await (await fetch(`${gw.url}/metrics`)).text();
  const value = (path: string): number => {
    const line = text.split('\n').find((l) => l.startsWith('gatehouse_budget_holds_total{') && l.includes(`path="${path}"`) && l.includes('outcome="granted"'));
    return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(' ') + 1));
  };
  return { lease: value('lease'), exact: value('exact'), leaseRequest: value('lease_request') };
}

describe.each(DB_KINDS)('budget leases on %s', (db) => {
  let gw: TestGateway;
  const clock = new ManualClock(Date.parse(WEDNESDAY_NOON));
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
    // Every answer uses its whole cap: each costs nearly its worst case.
    gw.stub.configure({ completionTokens: MAX_TOKENS });
    clock.set(WEDNESDAY_NOON);
  });

  it('serves a pair from one lease: one reservation statement for many requests, exact books once it is given back', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1, period: 'daily' });
    const before = await holdsMetric(gw);
    const hold = vi.spyOn(gw.gateway.app.get(BudgetDatabase), 'hold');
    const results = [];
    try {
      for (let i = 0; i < 20; i += 1) results.push(await t.api.post('/v1/chat/completions', REQUEST, FRESH));
      expect(results.map((r) => r.status)).toEqual(Array(20).fill(200));
      expect(hold).toHaveBeenCalledTimes(1);
    } finally {
      hold.mockRestore();
    }
    // Operators see it in /metrics: 20 holds served from the lease, one lease asked for, no exact statement.
    const after = await holdsMetric(gw);
    expect(after.lease - before.lease).toBe(20);
    expect(after.leaseRequest - before.leaseRequest).toBe(1);
    expect(after.exact - before.exact).toBe(0);
    // While it lives the lease is one reservation row. What the finished draws cost moves from
    // it to `spent` as the writer stores them (its own timer here): never counted twice.
    const charged = results.reduce((sum, r) => sum + costHeader(r), 0n);
    const left = String(LEASE_REQUESTS * worst - charged);
    await pollUntil(async () => {
      expect(await heldRows(gw, t.userId)).toEqual([{ request_id: 'budget-lease', user_nanos: left, department_nanos: left }]);
      expect(await storedBudget(gw, 'user', t.userId, { flush: false })).toMatchObject({ reserved: LEASE_REQUESTS * worst - charged, spent: charged });
    });

    // The budget views give the idle lease back before they read: the books are exact.
    const user = await storedBudget(gw, 'user', t.userId);
    expect(await heldRows(gw, t.userId)).toEqual([]);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(charged);
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
    expect((await storedBudget(gw, 'department', t.departmentId)).spent).toBe(charged);
    expect(gw.stub.hits).toBe(20);
  });

  it('takes a new lease when one is used up or has expired, and gives the old one back', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'daily' });
    const hold = vi.spyOn(gw.gateway.app.get(BudgetDatabase), 'hold');
    try {
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      clock.advance(LEASE_MS);
      expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(hold).toHaveBeenCalledTimes(2);
      // Each answer costs nearly a worst case: a lease of 32 covers about 32 of them, then the next is asked for.
      for (let i = 0; i < 40; i += 1) expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(hold).toHaveBeenCalledTimes(3);
    } finally {
      hold.mockRestore();
    }
    // Without any flush asked for, the writer's timer gives the retired leases back: one row remains, the current lease.
    await pollUntil(async () => {
      const rows = await heldRows(gw, t.userId);
      expect(rows).toHaveLength(1);
      expect((await storedBudget(gw, 'user', t.userId, { flush: false })).reserved).toBe(BigInt(rows[0]?.user_nanos ?? -1));
    });
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
  });

  it('takes no lease near the limit: the pair reserves exactly, and 50 racing requests get exactly what the budget covers', async () => {
    const limit = (worst * 11n) / 2n; // room for 5 worst cases, far from a lease of 32
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(limit), departmentBudgetUsd: 1000, period: 'daily' });
    const results = await Promise.all(Array.from({ length: 50 }, () => t.api.post('/v1/chat/completions', REQUEST, FRESH)));
    expect(results.filter((r) => r.status === 200)).toHaveLength(5);
    expect(results.filter((r) => r.status === 402)).toHaveLength(45);
    expect(gw.stub.hits).toBe(5);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.reserved).toBe(0n);
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
  });

  it('cannot overspend with a lease in play: 60 racing requests for 40 worst cases', async () => {
    const limit = (worst * 81n) / 2n;
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(limit), departmentBudgetUsd: 1000, period: 'daily' });
    const results = await Promise.all(Array.from({ length: 60 }, () => t.api.post('/v1/chat/completions', REQUEST, FRESH)));
    const served = results.filter((r) => r.status === 200);
    expect(served.length + results.filter((r) => r.status === 402).length).toBe(60);
    // Waiting for the lease instead of racing it: the burst is served up to the budget (a draw's
    // headroom above its actual cost comes back to the lease, so a few more may fit).
    expect(served.length).toBeGreaterThanOrEqual(38);
    expect(gw.stub.hits).toBe(served.length);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBeLessThanOrEqual(limit);
    expect(user.spent).toBe(served.reduce((sum, r) => sum + costHeader(r), 0n));
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
    expect(user.reserved).toBe(0n);
    console.info(`[budget leases] ${db}: 60 racing for 40 worst cases, served ${served.length}, spent $${formatUsd(user.spent)} of $${formatUsd(limit)}`);
  });

  it('gives a pair without any budget a lease like any other (one statement, one row), and a budget set on this instance applies at once', async () => {
    const t = await gw.tenants.create();
    const hold = vi.spyOn(gw.gateway.app.get(BudgetDatabase), 'hold');
    try {
      for (let i = 0; i < 5; i += 1) expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      expect(hold).toHaveBeenCalledTimes(1);
    } finally {
      hold.mockRestore();
    }
    // Its row is what a budget created while it lives counts (budget-created-in-flight.int-spec.ts).
    expect((await heldRows(gw, t.userId)).map((r) => r.request_id)).toEqual(['budget-lease']);
    expect((await gw.admin.put(`/admin/budgets/users/${t.userId}`, { limit_usd: 0, period: 'daily' })).status).toBe(200);
    expect(await heldRows(gw, t.userId)).toEqual([]);
    const refused = await t.api.post<{ error: { code: string } }>('/v1/chat/completions', REQUEST, FRESH);
    expect(refused.status).toBe(402);
    expect(refused.body.error.code).toBe('budget_exceeded');
  });

  it('applies a lowered budget at once on this instance, also to a lease taken while the change was being made', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'daily' });
    expect((await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    // While the new limit is being written, a request of the same user takes a lease under the old one.
    const ds = dataSourceOf(gw);
    const query = ds.query.bind(ds);
    let inWindow: number | undefined;
    const spy = vi.spyOn(ds, 'query').mockImplementation(async (...args: Parameters<typeof query>) => {
      if (typeof args[0] === 'string' && args[0].includes('UPDATE budgets SET limit_nanos')) {
        spy.mockRestore();
        inWindow = (await t.api.post('/v1/chat/completions', REQUEST, FRESH)).status;
      }
      return query(...args);
    });
    try {
      expect((await gw.admin.put(`/admin/budgets/users/${t.userId}`, { limit_usd: 0, period: 'daily' })).status).toBe(200);
    } finally {
      spy.mockRestore();
    }
    expect(inWindow).toBe(200);
    const after = await t.api.post<{ error: { code: string } }>('/v1/chat/completions', REQUEST, FRESH);
    expect(after.status).toBe(402);
    expect(after.body.error.code).toBe('budget_exceeded');
  });

  it("gives back the idle lease of a colleague when the department cannot cover a request otherwise", async () => {
    // The department covers 40 worst cases; the first user's lease holds 32 of them, idle.
    const first = await gw.tenants.create({ departmentBudgetUsd: formatUsd(worst * 40n), period: 'daily' });
    const second = await gw.tenants.create({ departmentId: first.departmentId });
    expect((await first.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
    // (less what its first draw cost, once the writer's timer has stored that draw)
    const held = (await storedBudget(gw, 'department', first.departmentId, { flush: false })).reserved;
    expect(held).toBeGreaterThan((LEASE_REQUESTS - 1n) * worst);
    expect(held).toBeLessThanOrEqual(LEASE_REQUESTS * worst);
    // Ten worst cases: no lease of 320 fits, and the exact reservation only once the idle lease is back.
    const big = { ...REQUEST, max_tokens: MAX_TOKENS * 10 };
    const res = await second.api.post('/v1/chat/completions', big, FRESH);
    expect(res.status).toBe(200);
    const department = await storedBudget(gw, 'department', first.departmentId);
    expect(department.reserved).toBe(0n);
    expect(department.spent).toBe(await ledgerSum(gw, 'department', first.departmentId, department.periodStart));
  });

  // A flush that committed but whose answer was lost is retried (it may not have committed). The
  // give-back of a retired lease used to be applied again by the retry: the row and `reserved`
  // lost the worst case of the stream still running, and the department admitted a 33rd call
  // its limit could not cover.
  it('gives a retired lease back once when its flush is retried after a commit whose answer was lost', async () => {
    const streamer = await gw.tenants.create();
    const colleague = await gw.tenants.create({ departmentId: streamer.departmentId });
    const limit = LEASE_REQUESTS * worst + 1n;
    expect((await gw.admin.put(`/admin/budgets/departments/${streamer.departmentId}`, { limit_usd: formatUsd(limit), period: 'daily' })).status).toBe(200);
    // A stream of 100 events 30 ms apart, which costs nearly its worst case: in flight throughout.
    gw.stub.configure({ completionTokens: MAX_TOKENS, chunkDelayMs: 30 });
    const stream = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${streamer.key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify({ ...REQUEST, stream: true }),
    });
    expect(stream.status).toBe(200);
    const reading = stream.text();
    expect((await storedBudget(gw, 'department', streamer.departmentId, { flush: false })).reserved).toBe(LEASE_REQUESTS * worst);

    const budget = gw.gateway.app.get(BudgetService);
    const database = gw.gateway.app.get(BudgetDatabase);
    const write = database.write.bind(database);
    const spy = vi.spyOn(database, 'write');
    const streamOnly = [{ request_id: 'budget-lease', user_nanos: worst.toString(), department_nanos: worst.toString() }];
    try {
      spy.mockImplementationOnce(async (statement: BudgetStatement, params: readonly unknown[]) => {
        await write(statement, params);
        throw new Error('connection terminated after commit');
      });
      budget.retireLeases();
      expect(await budget.flush()).toBe(false);
      expect(await heldRows(gw, streamer.userId)).toEqual(streamOnly);
      expect(await budget.flush()).toBe(true);
    } finally {
      spy.mockRestore();
    }
    // The retry gave nothing back twice: the running stream's worst case is still held.
    expect(await heldRows(gw, streamer.userId)).toEqual(streamOnly);
    expect((await storedBudget(gw, 'department', streamer.departmentId, { flush: false })).reserved).toBe(worst);

    // So the colleague gets the 31 worst cases left next to it, and not one more.
    gw.stub.configure({ completionTokens: MAX_TOKENS });
    let served = 0;
    for (let i = 0; i < 40; i++) {
      const res = await colleague.api.post('/v1/chat/completions', REQUEST, FRESH);
      if (res.status !== 200) {
        expect(res.status).toBe(402);
        break;
      }
      served += 1;
    }
    expect(served).toBe(Number(LEASE_REQUESTS) - 1);
    expect(await reading).toContain('data: [DONE]');
    const department = await storedBudget(gw, 'department', streamer.departmentId);
    expect(department.spent).toBeLessThanOrEqual(limit);
    expect(department.reserved).toBe(0n);
    expect(department.spent).toBe(await ledgerSum(gw, 'department', streamer.departmentId, department.periodStart));
  });
});
