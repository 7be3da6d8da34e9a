import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ApiClient, startTestGateway, type TestGateway } from '../support/gateway.js';

const SONNET = 'anthropic/claude-3.5-sonnet';
const MINI = 'openai/gpt-4o-mini';
const AUTO = 'openrouter/auto';
const PICKED = 'meta-llama/llama-3.1-8b-instruct';

/** The gatehouse_requests_total series of one scrape matching `labels`, summed. */
function requests(text: string, labels: Record<string, string>): number {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith('gatehouse_requests_total{')) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) total += Number(line.split(' ').at(-1));
  }
  return total;
}

// A hit is counted (ledger, metrics) under the model its miss was recorded as: the model the
// gateway asked for that answered, kept in the cache entry. Not the route's first model, and not
// the upstream's own name for the answer.
describe('a cache hit is counted under the model its miss was recorded as', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_NATIVE_FALLBACK: 'false', UPSTREAM_RETRY_ATTEMPTS: '1', BUDGET_LEASE_MS: '0' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('after a fallback answered the miss: in the metrics (JSON and stream hits)', async () => {
    const t = await gw.tenants.create();
    // The "code" rule walks SONNET then MINI; SONNET is down, so MINI answers the miss.
    gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
    const body = { task_type: 'code', temperature: 0, messages: [{ role: 'user', content: `hit label ${randomBytes(4).toString('hex')}` }] };
    const anonymous = new ApiClient(gw.url, undefined);
    const before = (await anonymous.get<string>('/metrics')).body;
    const first = await t.api.post('/v1/chat/completions', body);
    const second = await t.api.post('/v1/chat/completions', body);
    const streamed = await t.api.post<string>('/v1/chat/completions', { ...body, stream: true });
    expect([first, second, streamed].map((r) => r.headers.get('x-gateway-cache'))).toEqual(['miss', 'hit', 'hit']);
    expect(second.headers.get('x-gateway-model')).toBe(MINI);
    const after = (await anonymous.get<string>('/metrics')).body;
    const delta = (labels: Record<string, string>) => requests(after, labels) - requests(before, labels);
    expect({ miss: delta({ cache: 'miss', model: MINI }), hitMini: delta({ cache: 'hit', model: MINI }), hitSonnet: delta({ cache: 'hit', model: SONNET }) }).toEqual({
      miss: 1,
      hitMini: 2,
      hitSonnet: 0,
    });
  });

  it("when the answer's own name is none of the route's models: in the ledger", async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    // openrouter/auto names the model it picked, which extends no model of the route.
    gw.stub.configure({ models: { [SONNET]: { status: 503 }, [AUTO]: { answerModel: PICKED } } });
    const body = { model: SONNET, models: [AUTO], temperature: 0, messages: [{ role: 'user', content: `auto ${randomBytes(4).toString('hex')}` }] };
    const seen = [];
    for (let i = 0; i < 2; i++) seen.push((await t.api.post('/v1/chat/completions', body)).headers.get('x-gateway-cache'));
    expect(seen).toEqual(['miss', 'hit']);
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const usage = await t.api.get<{ spend: Array<{ model: string; requests: number }> }>('/v1/usage');
    // SONNET's row is the miss's failed attempt (503) only; the answer and its hit are AUTO's.
    expect(Object.fromEntries(usage.body.spend.map((s) => [s.model, s.requests]))).toEqual({ [AUTO]: 2, [SONNET]: 1 });
  });
});
