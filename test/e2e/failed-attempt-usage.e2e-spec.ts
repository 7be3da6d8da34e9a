import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { FRESH, ledgerRows, MAX_TOKENS, MODEL, REQUEST, storedBudget, worstCaseNanos } from '../integration/budget-support.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

const CHEAPER = 'anthropic/claude-3-haiku';

// A JSON 200 that reports an error mid-generation carries the usage the upstream billed, and the
// failed attempt is charged it. Such a failure is retried (or falls back), while the reservation
// holds the worst case of one attempt: before the next attempt goes out, the reservation is topped
// up by the failed attempt's charge, or the call ends there. Before, the failed attempt was charged
// up to the whole reservation and the retry in full on top: up to twice what was held.
describe.each(DB_KINDS)('failed attempts that report usage, on %s', (db) => {
  let gw: TestGateway;
  let worst: bigint;
  beforeAll(async () => {
    gw = await startTestGateway({ db, env: { RATE_LIMIT_KEY_RPM: '100000', RATE_LIMIT_USER_RPM: '100000', RATE_LIMIT_DEPARTMENT_RPM: '100000' } });
    worst = worstCaseNanos(gw, { messages: REQUEST.messages }, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  /** A 200 that failed mid-generation and bills `cost` (OpenRouter's `usage.cost`), as OpenRouter answers it. */
  function failMidGeneration(res: ServerResponse, model: unknown, cost: bigint): void {
    const words = Array.from({ length: MAX_TOKENS }, () => 'w ').join('');
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({
        id: 'chatcmpl-x',
        object: 'chat.completion',
        created: 1,
        model,
        choices: [{ index: 0, message: { role: 'assistant', content: words }, finish_reason: 'error' }],
        error: { code: 502, message: 'provider failed mid-generation' },
        usage: { prompt_tokens: 5, completion_tokens: MAX_TOKENS, total_tokens: 5 + MAX_TOKENS, cost: Number(formatUsd(cost)) },
      }),
    );
  }

  function answer(res: ServerResponse, model: unknown): void {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({
        id: 'chatcmpl-y',
        object: 'chat.completion',
        created: 1,
        model,
        choices: [{ index: 0, message: { role: 'assistant', content: 'fine' }, finish_reason: 'stop' }],
        usage: { prompt_tokens: 5, completion_tokens: MAX_TOKENS, total_tokens: 5 + MAX_TOKENS },
      }),
    );
  }

  // The fallback comes after both tries of the first model (UPSTREAM_RETRY_ATTEMPTS=2) failed.
  it.each([
    ['a retry', [MODEL], 1],
    ['a fallback', [CHEAPER, MODEL], 2],
  ])("hold the next attempt's worst case before %s goes out, so a call running meanwhile cannot take the budget past its limit", async (_, chain, failing) => {
    const chainWorst = worstCaseNanos(gw, { messages: REQUEST.messages }, chain, MAX_TOKENS);
    // Two worst cases of the call: its own and, once its failed tries billed all of it, its retry's.
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(2n * chainWorst), period: 'total' });
    const body = chain.length > 1 ? { ...REQUEST, model: chain[0], models: chain } : REQUEST;
    const other = { ...REQUEST, messages: [{ role: 'user', content: 'ho' }] };
    let parked: (() => void) | undefined;
    let tries = 0;
    gw.stub.script = (_req, sent, res) => {
      if (JSON.stringify(sent.messages) !== JSON.stringify(REQUEST.messages)) return false; // the other call: the stub answers
      tries += 1;
      if (tries <= failing) failMidGeneration(res, sent.model, chainWorst / BigInt(failing));
      else parked = () => answer(res, sent.model); // the retry answers once the other call was asked
      return true;
    };
    const first = t.api.post('/v1/chat/completions', body, FRESH);
    await pollUntil(() => expect(parked).toBeDefined());
    // The call holds its own worst case and what its failed try was charged.
    expect((await storedBudget(gw, 'user', t.userId, { flush: false })).reserved).toBeGreaterThan(chainWorst);
    const meanwhile = await t.api.post('/v1/chat/completions', other, FRESH);
    parked?.();
    const res = await first;
    expect(res.status).toBe(200);
    expect(meanwhile).toMatchObject({ status: 402, body: { error: { code: 'budget_exceeded', param: 'user' } } });
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.attempt, r.model, r.outcome])).toEqual([
      ...Array.from({ length: failing }, (_, i) => [i, chain[0], 'http']),
      [failing, chain.at(-1), 'ok'],
    ]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBe(rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n));
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.reserved).toBe(0n);
  });

  it('end the call with its failure when the budget cannot hold another attempt: not retried, charged what it used', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    // The first try bills the whole worst case; a retry would succeed.
    gw.stub.script = (_req, sent, res) => {
      if (gw.stub.hits > 1) return false;
      failMidGeneration(res, sent.model, worst);
      return true;
    };
    const res = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
    expect(res).toMatchObject({ status: 502, body: { error: { code: 'upstream_error' } } });
    expect(gw.stub.hits).toBe(1);
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.outcome, r.cost_source])).toEqual([['http', 'upstream']]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBe(BigInt(rows[0]?.cost_nanos ?? -1));
    expect(user.spent).toBeGreaterThan(0n);
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.reserved).toBe(0n);
  });

  it("end a job's try the same way (door=job)", async () => {
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worst), period: 'total' });
    gw.stub.script = (_req, sent, res) => {
      if (gw.stub.hits > 1) return false;
      failMidGeneration(res, sent.model, worst);
      return true;
    };
    const accepted = await t.api.post<{ id: string }>('/v1/chat/completions', REQUEST, { prefer: 'respond-async', ...FRESH });
    expect(accepted.status).toBe(202);
    const job = await pollUntil(async () => {
      const res = await t.api.get<{ status: string }>(`/v1/jobs/${accepted.body.id}`);
      expect(['completed', 'failed']).toContain(res.body.status);
      return res.body;
    }, 20_000);
    expect(job.status).toBe('failed');
    expect(gw.stub.hits).toBe(1);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.door, r.outcome])).toEqual([['job', 'http']]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBe(BigInt(rows[0]?.cost_nanos ?? -1));
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.reserved).toBe(0n);
  });

  // 10 worst cases: exact reservations (a lease of 32 does not fit); 100: the top-ups are draws on the pair's lease.
  it.each([
    ['exact reservations', 10n],
    ['a lease', 100n],
  ])('keep going while the budget holds each billed try on top (%s): spent == Σ ledger ≤ limit, nothing left held', async (_, worstCases) => {
    const t = await gw.tenants.create({ userBudgetUsd: formatUsd(worstCases * worst), period: 'total' });
    // Each try produces (and reports) all of its max_tokens, then fails mid-generation.
    gw.stub.configure({ completionTokens: MAX_TOKENS, errorAfterChunks: MAX_TOKENS });
    const res = await t.api.post('/v1/chat/completions', REQUEST, FRESH);
    expect(res.status).toBe(502);
    expect(gw.stub.hits).toBeGreaterThan(1);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.length).toBe(gw.stub.hits);
    expect(rows.every((r) => BigInt(r.cost_nanos) > 0n && BigInt(r.cost_nanos) <= worst)).toBe(true);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBe(rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n));
    expect(user.spent).toBeLessThanOrEqual(user.limit);
    expect(user.reserved).toBe(0n);
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
