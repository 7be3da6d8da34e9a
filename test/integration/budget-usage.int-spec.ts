import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tokensCost } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { PricingService } from '../../src/upstream/pricing/pricing.service.js';
import { DB_KINDS } from '../support/databases.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';
import { costHeader, FRESH, heldRows, ledgerRows, ledgerSum, MAX_TOKENS, MODEL, principalOf, storedBudget, worstCaseNanos } from './budget-support.js';

// An upstream whose `usage` the gateway cannot take as it is: the call was answered, so it must
// be answered and charged, never a 500 with nothing recorded and its hold left behind.

/** Raw `usage` JSON the upstream reports, chosen by the prompt (raw: `1e400` is no JS number). */
const USAGES: Record<string, string> = {
  fractional: '{"prompt_tokens":10.5,"completion_tokens":2,"total_tokens":12.5}',
  negative: '{"prompt_tokens":-1000,"completion_tokens":2,"total_tokens":-998}',
  infinite: '{"prompt_tokens":1e400,"completion_tokens":2}',
};
const CONTENT = 'hello there';
/** The prompt for which the upstream ignores its cap: far more text than MAX_TOKENS, and no usage. */
const VERBOSE = 'verbose';
const VERBOSE_CONTENT = 'lorem ipsum dolor sit amet '.repeat(100);

function startOddUpstream(): Promise<{ url: string; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    let text = '';
    req.on('data', (chunk: Buffer) => (text += chunk.toString()));
    req.on('end', () => {
      if (!req.url?.endsWith('/chat/completions')) {
        res.writeHead(404).end('{}');
        return;
      }
      const body = JSON.parse(text) as { stream?: boolean; messages: Array<{ content: string }> };
      const prompt = body.messages[0]?.content ?? '';
      const usage = USAGES[prompt] ?? 'null';
      const content = prompt === VERBOSE ? VERBOSE_CONTENT : CONTENT;
      const head = `"id":"odd","created":1,"model":"${MODEL}"`;
      if (body.stream) {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(
          `data: {${head},"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"${content}"},"finish_reason":null}]}\n\n`,
        );
        res.write(`data: {${head},"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n`);
        res.write(`data: {${head},"object":"chat.completion.chunk","choices":[],"usage":${usage}}\n\n`);
        res.end('data: [DONE]\n\n');
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(
        `{${head},"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"${content}"},"finish_reason":"stop"}],"usage":${usage}}`,
      );
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => new Promise<void>((done) => server.close(() => done())),
      }),
    );
  });
}

describe.each(DB_KINDS)('usage the gateway cannot take as it is, on %s', (db) => {
  let gw: TestGateway;
  let upstream: Awaited<ReturnType<typeof startOddUpstream>>;

  beforeAll(async () => {
    upstream = await startOddUpstream();
    gw = await startTestGateway({ db, env: { OPENROUTER_BASE_URL: upstream.url } });
  });
  afterAll(async () => {
    await gw?.close();
    await upstream?.close();
  });

  /** Sends one call with `prompt` and checks what every case must hold: answered, charged what it said, nothing left held. */
  async function call(prompt: string, stream = false) {
    const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
    const res = await t.api.post<string>('/v1/chat/completions', { model: MODEL, max_tokens: MAX_TOKENS, stream, messages: [{ role: 'user', content: prompt }] }, FRESH);
    expect(res.status).toBe(200);
    if (stream) expect(res.body.trimEnd().endsWith('data: [DONE]')).toBe(true);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows).toHaveLength(1);
    const user = await storedBudget(gw, 'user', t.userId);
    expect(user.spent).toBe(await ledgerSum(gw, 'user', t.userId, user.periodStart));
    expect(user.reserved).toBe(0n);
    expect(await heldRows(gw, t.userId)).toEqual([]);
    // The JSON answer says what it was charged; a stream's header leaves before the usage arrives.
    if (!stream) expect(costHeader(res)).toBe(user.spent);
    return rows[0];
  }

  it.each([false, true])('charges fractional token counts rounded to whole tokens (stream: %s)', async (stream) => {
    const price = gw.gateway.app.get(PricingService).priceOf(MODEL);
    const row = await call('fractional', stream);
    expect(row).toMatchObject({ prompt_tokens: 11, completion_tokens: 2, cost_source: 'pricing_table', outcome: 'ok' });
    expect(row?.cost_nanos).toBe((tokensCost(11, price.prompt) + tokensCost(2, price.completion)).toString());
  });

  it.each(['negative', 'infinite'])('charges the estimate, as for an answer without usage, when a count is %s', async (prompt) => {
    const row = await call(prompt);
    expect(row).toMatchObject({ cost_source: 'estimate', outcome: 'ok' });
    expect(BigInt(row?.cost_nanos ?? -1)).toBeGreaterThan(0n);
  });

  it('settles without throwing for a usage no one read through readUsage: charged as an answer without usage', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const principal = principalOf(t);
    const route = { models: [MODEL], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const reservation = await budget.reserve({ principal, requestId: 'hand-made', door: 'chat', body: { messages: [{ role: 'user', content: 'hi' }] } }, route);
    const usage = { prompt_tokens: 10.5, completion_tokens: -3, total_tokens: 7.5 };
    const { costNanos: cost } = budget.settle(reservation, [{ model: MODEL, ok: true, status: 200, failure: undefined, usage }], { producedBytes: CONTENT.length });
    expect(cost).toBeGreaterThan(0n);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.cost_source, r.cost_nanos])).toEqual([['estimate', cost.toString()]]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect([user.spent, user.reserved]).toEqual([cost, 0n]);
  });

  it.each([false, true])('charges an answer without usage at most its cap, however much text it carries (stream: %s)', async (stream) => {
    // Characters ÷ 3 would be ~900 tokens; the upstream was sent a cap of MAX_TOKENS.
    const worst = worstCaseNanos(gw, { messages: [{ role: 'user', content: VERBOSE }] }, [MODEL], MAX_TOKENS);
    const row = await call(VERBOSE, stream);
    expect(row).toMatchObject({ cost_source: 'estimate', completion_tokens: MAX_TOKENS, outcome: 'ok' });
    expect(BigInt(row?.cost_nanos ?? -1)).toBeLessThanOrEqual(worst);
  });

  it('charges an estimate no more than the worst case reserved, also after the price rose during the call', async () => {
    const model = `test/raised-${Date.now()}`;
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const principal = principalOf(t);
    const route = { models: [model], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const reservation = await budget.reserve({ principal, requestId: 'price-raised', door: 'chat', body: { messages: [{ role: 'user', content: 'hi' }] } }, route);
    expect((await gw.admin.put(`/admin/pricing/${model}`, { prompt: '0.01', completion: '0.01' })).status).toBe(200);
    const cut = { model, ok: false, status: 200, failure: 'upstream_cut', usage: undefined };
    const { costNanos: cost } = budget.settle(reservation, [cut], { producedBytes: 30 });
    // At the price it was admitted at (no override then: the fallback price), never past its worst case.
    const admitted = gw.gateway.app.get(PricingService).fallback;
    expect(cost).toBe(tokensCost(reservation.promptTokens, admitted.prompt) + tokensCost(10, admitted.completion));
    expect(cost).toBeLessThanOrEqual(reservation.amountNanos);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.cost_source, r.cost_nanos])).toEqual([['estimate', cost.toString()]]);
    const user = await storedBudget(gw, 'user', t.userId);
    expect([user.spent, user.reserved]).toEqual([cost, 0n]);
  });

  it('charges usage it prices itself at the price the call was admitted at, after the price rose during the call', async () => {
    const model = `test/raised-usage-${Date.now()}`;
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const budget = gw.gateway.app.get(BudgetService);
    const route = { models: [model], maxTokens: MAX_TOKENS, ruleTaskType: 'general' };
    const call = { principal: principalOf(t), requestId: 'price-raised-usage', door: 'chat', body: { messages: [{ role: 'user', content: 'hi' }] } };
    const reservation = await budget.reserve(call, route);
    // 100× the price while the call runs: these tokens would now cost ~$2, over the $1 budget.
    expect((await gw.admin.put(`/admin/pricing/${model}`, { prompt: '0.01', completion: '0.01' })).status).toBe(200);
    const usage = { prompt_tokens: 100, completion_tokens: 100, total_tokens: 200 };
    const { costNanos: cost } = budget.settle(reservation, [{ model, ok: true, status: 200, failure: undefined, usage }]);
    const admitted = gw.gateway.app.get(PricingService).fallback;
    expect(cost).toBe(tokensCost(100, admitted.prompt) + tokensCost(100, admitted.completion));
    const user = await storedBudget(gw, 'user', t.userId);
    expect([user.spent, user.reserved]).toEqual([cost, 0n]);
    expect(user.spent).toBeLessThanOrEqual(1_000_000_000n);
    // What the upstream says it billed (usage.cost) is recorded as it is.
    const rich = await gw.tenants.create({ userBudgetUsd: 5 });
    const billed = await budget.reserve({ ...call, principal: principalOf(rich), requestId: 'price-raised-billed' }, route);
    const { costNanos: upstreamCost } = budget.settle(billed, [{ model, ok: true, status: 200, failure: undefined, usage: { ...usage, cost: 0.5 } }]);
    expect(upstreamCost).toBe(500_000_000n);
  });
});
