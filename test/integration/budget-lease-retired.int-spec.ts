import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { ManualClock } from '../../src/core/clock.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { BODY, FRESH, heldRows, ledgerSum, MAX_TOKENS, MODEL, REQUEST, storedBudget, WEDNESDAY_NOON, worstCaseNanos } from './budget-support.js';

// A lease holds BUDGET_LEASE_REQUESTS (32) worst cases. Retired (here: expired) while one long
// stream still draws on it, it must keep only what that stream may cost, not all 32 until the
// stream ends: other users of the department would be refused what nobody can use.

describe.each(DB_KINDS)('a lease retired while a long stream draws on it, on %s', (db) => {
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
    clock.set(WEDNESDAY_NOON);
  });

  it('gives back all but the stream’s worst case, so a colleague is served while the stream goes on', async () => {
    const streamer = await gw.tenants.create();
    const colleague = await gw.tenants.create({ departmentId: streamer.departmentId });
    // The streamer's lease of 32 worst cases fits; once it is taken, less than one is left.
    const set = await gw.admin.put(`/admin/budgets/departments/${streamer.departmentId}`, { limit_usd: formatUsd(32n * worst + worst / 2n), period: 'daily' });
    expect(set.status).toBe(200);
    // A stream that goes on until the test cuts it.
    gw.stub.configure({ completionTokens: MAX_TOKENS, chunkDelayMs: 1000 });
    const cut = new AbortController();
    const stream = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${streamer.key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify({ ...REQUEST, stream: true }),
      signal: cut.signal,
    });
    expect(stream.status).toBe(200);
    const reading = stream.text().catch(() => undefined);
    expect((await storedBudget(gw, 'department', streamer.departmentId, { flush: false })).reserved).toBe(32n * worst);

    clock.advance(gw.config.budget.leaseMs);
    try {
      const served = await colleague.api.post('/v1/chat/completions', REQUEST, FRESH);
      expect(served.status).toBe(200);
      // The expired lease still holds what the stream may cost, and only that (on the user too,
      // who has no budget: one created before the stream ends counts it).
      expect(await heldRows(gw, streamer.userId)).toEqual([{ request_id: 'budget-lease', user_nanos: worst.toString(), department_nanos: worst.toString() }]);
    } finally {
      cut.abort();
      await reading;
    }

    // The cut stream settles, its lease row goes with it: the books are exact.
    await pollUntil(async () => {
      const department = await storedBudget(gw, 'department', streamer.departmentId);
      expect(department.reserved).toBe(0n);
      expect(await heldRows(gw, streamer.userId)).toEqual([]);
      expect(department.spent).toBeGreaterThan(0n);
      expect(department.spent).toBe(await ledgerSum(gw, 'department', streamer.departmentId, department.periodStart));
    });
  });
});
