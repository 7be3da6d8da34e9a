import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { FRESH, ledgerRows, MAX_TOKENS, MODEL, REQUEST, storedBudget, worstCaseNanos } from '../integration/budget-support.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';

// A JSON 200 that reports an error mid-generation carries the usage the upstream billed, and the
// failed attempt is charged it. Such a failure is retried (or falls back), while the reservation
// holds the worst case of one attempt.
describe('failed attempts that report usage', () => {
  let gw: TestGateway;
  let worst: bigint;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { RATE_LIMIT_KEY_RPM: '100000', RATE_LIMIT_USER_RPM: '100000', RATE_LIMIT_DEPARTMENT_RPM: '100000' } });
    worst = worstCaseNanos(gw, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('never take a call past the worst case it was admitted for, however many tries report usage', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    // Each try produces (and reports) all of its max_tokens, then fails mid-generation.
    gw.stub.configure({ completionTokens: MAX_TOKENS, errorAfterChunks: MAX_TOKENS });
    const res = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
    expect(res.status).toBe(502);
    expect(gw.stub.hits).toBeGreaterThan(1);
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.length).toBe(gw.stub.hits);
    expect(BigInt(rows[0]?.cost_nanos ?? 0)).toBeGreaterThan(0n);
    const spent = rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n);
    expect(spent).toBeLessThanOrEqual(worst);
    expect((await storedBudget(gw, 'user', t.userId)).spent).toBe(spent);
  });

  it('count against token limits as they are charged', async () => {
    const t = await gw.tenants.create();
    await gw.admin.put(`/admin/rate-limits/users/${t.userId}`, { requests_per_minute: 100, tokens_per_minute: 40 });
    // Every try produces 30 words, reports them in its usage, then fails mid-generation (502).
    gw.stub.configure({ completionTokens: 30, errorAfterChunks: 30 });
    const failed = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `x ${randomBytes(4).toString('hex')}` }] });
    expect(failed.status).toBe(502);
    gw.stub.reset();
    const next = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `y ${randomBytes(4).toString('hex')}` }] });
    expect(next).toMatchObject({ status: 429, body: { error: { code: 'rate_limit_exceeded', param: 'user' } } });
  });
});
