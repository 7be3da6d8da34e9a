import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { dataSourceOf, ledgerRows, MAX_TOKENS, MODEL, REQUEST, storedBudget, worstCaseNanos } from '../integration/budget-support.js';
import { DB_KINDS } from '../support/databases.js';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Before: an async submit was accepted (202) when the budget could not cover it, and
// only its job failed later with budget_exceeded. API.md: 402 when the user or department budget
// cannot cover the request, `param` naming the scope. The check at submit reads; it holds nothing.

const ASYNC = { prefer: 'respond-async' };
const FRESH = { 'cache-control': 'no-cache, no-store' };
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

interface Reply {
  id: string;
  status: string;
  error: { code: string; type: string; param: string | null; message: string; resets_at?: string | null } | null;
}

describe.each(DB_KINDS)('async submits against budgets on %s', (kind) => {
  let gw: TestGateway;
  let worst: bigint;

  beforeAll(async () => {
    gw = await startTestGateway({ db: kind, env: NO_RATE_LIMITS });
    worst = worstCaseNanos(gw, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const submit = (t: Tenant, headers: Record<string, string> = {}) =>
    t.api.post<Reply & { error: NonNullable<Reply['error']> }>('/v1/chat/completions', REQUEST, { ...ASYNC, ...FRESH, ...headers });

  async function jobsOf(t: Tenant): Promise<number> {
    const [row] = await dataSourceOf(gw).query<Array<{ n: string }>>(`SELECT count(*) AS n FROM jobs WHERE user_id = $1`, [t.userId]);
    return Number(row?.n);
  }

  async function finished(t: Tenant, id: string): Promise<Reply> {
    return pollUntil(async () => {
      const res = await t.api.get<Reply>(`/v1/jobs/${id}`);
      expect(['completed', 'failed']).toContain(res.body.status);
      return res.body;
    }, 20_000);
  }

  /** Nothing was held, charged, queued or sent upstream for the refused submits. */
  async function expectNothingTaken(t: Tenant): Promise<void> {
    expect(await jobsOf(t)).toBe(0);
    expect(gw.stub.hits).toBe(0);
    for (const [scope, id] of [
      ['user', t.userId],
      ['department', t.departmentId],
    ] as const) {
      expect(await ledgerRows(gw, scope, id)).toEqual([]);
    }
    expect(await storedBudget(gw, 'user', t.userId)).toMatchObject({ spent: 0n, reserved: 0n });
  }

  it('answers 402 budget_exceeded naming the user when the user budget cannot cover the worst case, as the sync call is answered', async () => {
    const alice = await gw.tenants.create({ userBudgetUsd: formatUsd(worst - 1n), period: 'total' });
    const refused = await submit(alice);
    expect(refused).toMatchObject({ status: 402, body: { error: { type: 'insufficient_quota', code: 'budget_exceeded', param: 'user', resets_at: null } } });
    expect(refused.headers.get('location')).toBeNull();
    const sync = await alice.api.post<{ error: { message: string; param: string } }>('/v1/chat/completions', REQUEST, FRESH);
    expect(sync).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'user' } } });
    expect(refused.body.error.message).toBe(sync.body.error.message);
    await expectNothingTaken(alice);
  });

  it('names the department when its budget is the one that cannot cover it, on /v1/complete too', async () => {
    const bob = await gw.tenants.create({ userBudgetUsd: 5, departmentBudgetUsd: formatUsd(worst - 1n), period: 'daily' });
    expect(await submit(bob)).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'department' } } });
    const complete = await bob.api.post('/v1/complete', { prompt: 'hi', model: MODEL, max_tokens: MAX_TOKENS }, { ...ASYNC, ...FRESH });
    expect(complete).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'department' } } });
    await expectNothingTaken(bob);
  });

  it('accepts a job its budget covers, and refuses the next once spending has used the budget up', async () => {
    // Room for exactly one worst case: the first job's cost (at least a nano-dollar) leaves less.
    const carol = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    const accepted = await submit(carol);
    expect(accepted.status).toBe(202);
    expect(await finished(carol, accepted.body.id)).toMatchObject({ status: 'completed' });
    expect((await storedBudget(gw, 'user', carol.userId)).spent).toBeGreaterThan(0n);

    const refused = await submit(carol);
    expect(refused).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'user' } } });
    expect(await jobsOf(carol)).toBe(1);
    expect(gw.stub.hits).toBe(1);
  });

  it('still fails a job on its try with budget_exceeded when the budget it was accepted under is taken before it runs', async () => {
    // Room for one worst case. The first job holds it while its (slow) upstream answers, so the
    // second, accepted at submit (nothing spent yet), cannot reserve when it runs: the real
    // reservation stays at run time, and the submit check held nothing for either.
    const erin = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    gw.stub.configure({ latencyMs: 3000 });
    const first = await submit(erin);
    const second = await submit(erin);
    expect([first.status, second.status]).toEqual([202, 202]);
    const outcomes = await Promise.all([finished(erin, first.body.id), finished(erin, second.body.id)]);
    expect(outcomes.map((j) => j.status).sort()).toEqual(['completed', 'failed']);
    expect(outcomes.find((j) => j.status === 'failed')).toMatchObject({ attempts: 1, dead_lettered: false, error: { code: 'budget_exceeded', param: 'user' } });
    expect(gw.stub.hits).toBe(1);
  });

  it('still answers a repeat of an accepted idempotent submit with its job; a new key is refused and leaves no record behind', async () => {
    const dave = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    const first = await submit(dave, { 'idempotency-key': 'report-1' });
    expect(first.status).toBe(202);
    await finished(dave, first.body.id);

    const repeat: HttpResult<Reply> = await submit(dave, { 'idempotency-key': 'report-1' });
    expect(repeat).toMatchObject({ status: 202, body: { id: first.body.id, status: 'completed' } });
    expect(repeat.headers.get('idempotent-replayed')).toBe('true');

    expect(await submit(dave, { 'idempotency-key': 'report-2' })).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'user' } } });
    expect(await jobsOf(dave)).toBe(1);
    // Raised budget: the same key is a new submit now, not a job that was never accepted.
    expect((await gw.admin.put(`/admin/budgets/users/${dave.userId}`, { limit_usd: 5, period: 'total' })).status).toBe(200);
    const later = await submit(dave, { 'idempotency-key': 'report-2' });
    expect(later.status).toBe(202);
    expect(later.headers.get('idempotent-replayed')).toBeNull();
  });
});
