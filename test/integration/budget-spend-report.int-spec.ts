import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { dataSourceOf, flushBudgets, FRESH, REQUEST } from './budget-support.js';

// The usage reports count one request per charged call. Callers choose x-request-id, and job
// tries repeat theirs, so calls that share one are still each a request; so is every cache hit,
// however the ledger counts them.

interface SpendLine {
  requests: number;
  attempts: number;
}

describe.each(DB_KINDS)('requests in the usage reports on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('counts every call once, also calls sharing an x-request-id, cache hits, and rows from before charge ids', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const same = { 'x-request-id': `shared-${randomUUID()}` };
    let requests = 0;
    let attempts = 0;
    const send = async (body: object, headers: Record<string, string>) => {
      const res = await t.api.post('/v1/chat/completions', body, { ...headers, ...same });
      expect(res.status).toBe(200);
      requests += 1;
      attempts += 1;
      return res;
    };

    await send(REQUEST, FRESH);
    await send(REQUEST, FRESH);
    // One more call, its first attempt failed: two attempts, still one request.
    gw.stub.configure({ models: { [REQUEST.model]: { status: 503, failTimes: 1 } } });
    await send(REQUEST, FRESH);
    attempts += 1;
    gw.stub.reset();
    // A miss that fills the cache, then hits (each one a request, counted into shared rows).
    const cacheable = { ...REQUEST, messages: [{ role: 'user', content: `cache me ${randomUUID()}` }] };
    await send(cacheable, {});
    await pollUntil(async () => expect((await send(cacheable, {})).headers.get('x-gateway-cache')).toBe('hit'));
    expect((await send(cacheable, {})).headers.get('x-gateway-cache')).toBe('hit');

    // Two attempts of one call stored before ledger rows had a charge id: one request.
    await flushBudgets(gw);
    for (const attempt of [0, 1]) {
      await dataSourceOf(gw).query(
        `INSERT INTO usage_ledger (request_id, attempt, user_id, department_id, model, cost_nanos, cost_source, outcome, door, created_at)
         VALUES ('legacy', $1, $2, $3, $4, 0, 'none', 'ok', 'chat', now())`,
        [attempt, t.userId, t.departmentId, REQUEST.model],
      );
    }
    requests += 1;
    attempts += 2;

    const usage = await t.api.get<{ spend: Array<SpendLine & { model: string }> }>('/v1/usage');
    expect(usage.status).toBe(200);
    expect(usage.body.spend).toEqual([expect.objectContaining({ model: REQUEST.model, requests, attempts })]);
    const spend = await gw.admin.get<{ data: Array<SpendLine & { user_id: string }> }>('/admin/spend?group_by=user');
    expect(spend.body.data.find((line) => line.user_id === t.userId)).toMatchObject({ requests, attempts });
  });

  it('shows a budget view for the user and the department, an unlimited scope included, as the admin API shows it', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'daily' });
    const unbudgeted = await gw.tenants.create();
    for (const caller of [t, unbudgeted]) {
      expect((await caller.api.post('/v1/chat/completions', REQUEST, FRESH)).status).toBe(200);
      const usage = await caller.api.get<{ user: unknown; department: unknown }>('/v1/usage');
      expect(usage.status).toBe(200);
      expect(usage.body.user).toEqual((await gw.admin.get(`/admin/budgets/users/${caller.userId}`)).body);
      expect(usage.body.department).toEqual((await gw.admin.get(`/admin/budgets/departments/${caller.departmentId}`)).body);
    }
    const usage = await unbudgeted.api.get<{ department: unknown }>('/v1/usage');
    expect(usage.body.department).toMatchObject({ scope: 'department', id: unbudgeted.departmentId, limit_usd: null, remaining_usd: null });
  });
});
