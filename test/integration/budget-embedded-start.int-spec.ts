import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetSweeper } from '../../src/budget/budget-sweeper.service.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { FRESH, heldRows, MAX_TOKENS, MODEL, REQUEST, storedBudget, worstCaseNanos } from './budget-support.js';

// The embedded database belongs to one process; a hold found when a process starts on it was left
// by the one before, which died between reserve and settle. Released at start (a job that process
// left running runs again at once, and would be refused on its own dead try's hold), not after
// BUDGET_RESERVATION_TTL_MS. Here the "previous process" is a call still hanging at the upstream:
// what a restart finds in the table is the same row.
describe('holds found when a process starts on the embedded database', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ db: 'pglite' });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('are released, and a settle that still comes only adds its cost', async () => {
    const worst = worstCaseNanos(gw, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
    // Room for one and a half calls: the call holds exactly (a lease of 32 does not fit).
    const alice = await gw.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'total' });
    gw.stub.configure({ latencyMs: 1500 });
    const call = alice.api.post('/v1/chat/completions', REQUEST, FRESH);
    await pollUntil(async () => expect((await heldRows(gw, alice.userId)).length).toBe(1), 10_000, 20);
    expect((await storedBudget(gw, 'user', alice.userId, { flush: false })).reserved).toBe(worst);

    expect(await gw.gateway.app.get(BudgetSweeper).releaseAllAtStart()).toBe(1);
    expect(await heldRows(gw, alice.userId)).toEqual([]);
    expect((await storedBudget(gw, 'user', alice.userId, { flush: false })).reserved).toBe(0n);

    expect((await call).status).toBe(200);
    const after = await storedBudget(gw, 'user', alice.userId);
    expect(after.reserved).toBe(0n);
    expect(after.spent > 0n && after.spent <= worst).toBe(true);
  });
});
