import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd, tokensCost } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { producedTokens } from '../../src/budget/estimate.js';
import { CompletionService } from '../../src/completion/completion.service.js';
import type { CompletionCall, CompletionMeta, StreamSink } from '../../src/completion/completion.types.js';
import { PricingService } from '../../src/upstream/pricing/pricing.service.js';
import { ledgerRows, storedBudget } from '../integration/budget-support.js';
import { postSse, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// What an upstream says inside a 200 (OpenRouter's errors once a model started, its keep-alives,
// the model names it answers with) and how the gateway must take it: as the failure it reports,
// bounded by the deadline, priced as the model the gateway asked for. Both drivers, where they differ.

const MINI = 'openai/gpt-4o-mini';
const SONNET = 'anthropic/claude-3.5-sonnet';
const DATED = 'openai/gpt-4o-mini-2024-07-18';
const FAST_RETRIES = { UPSTREAM_RETRY_BASE_MS: '1', UPSTREAM_RETRY_MAX_DELAY_MS: '5', UPSTREAM_RETRY_ATTEMPTS: '2' };
const DRIVERS = ['undici', 'sdk'] as const;

interface ErrorBody {
  error: { message: string; type: string; code: string };
}
interface Completion {
  model: string;
  choices: Array<{ message: { content: string } }>;
  usage: { prompt_tokens: number; completion_tokens: number };
}

let prompts = 0;
/** A prompt no other test sends: every call reaches the upstream unless a test means the cache. */
const unique = (text: string) => `${text} #${++prompts}-${Date.now()}`;

function sse(gw: TestGateway, key: string, body: Record<string, unknown>): Promise<{ status: number; headers: Headers; events: string[]; text: string }> {
  return postSse(gw, key, { messages: [{ role: 'user', content: unique('one two three four five six seven') }], stream: true, ...body });
}

const contentOf = (events: string[]) =>
  events
    .filter((e) => e !== '[DONE]')
    .map((e) => (JSON.parse(e) as { choices?: Array<{ delta?: { content?: string } }> }).choices?.[0]?.delta?.content ?? '')
    .join('');

describe.each(DRIVERS)('errors inside a 200 (%s driver)', (driver) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...FAST_RETRIES, UPSTREAM_DRIVER: driver, BUDGET_LEASE_MS: '0' } });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('a stream whose first event is an error is a failed attempt: retried, then answered whole, the failed try free', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ status: 502, errorInBody: true, failTimes: 1 });
    const { status, events } = await sse(gw, t.key, {});
    expect(status).toBe(200);
    expect(events.some((e) => e.includes('"error"'))).toBe(false);
    expect(contentOf(events)).toMatch(/^Mock reply to: one two three/);
    expect(gw.stub.hits).toBe(2);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.outcome, r.status, r.cost_nanos === '0'])).toEqual([
      ['http', 502, true],
      ['ok', 200, false],
    ]);
  });

  it('falls back to the next model when the first answers with an error event', async () => {
    const t = await gw.tenants.create();
    gw.stub.configure({ models: { [SONNET]: { status: 503, errorInBody: true } } });
    const { status, headers, events } = await sse(gw, t.key, { task_type: 'code' });
    expect(status).toBe(200);
    expect(headers.get('x-gateway-model')).toBe(MINI);
    expect(events.at(-1)).toBe('[DONE]');
    expect(events.some((e) => e.includes('"error"'))).toBe(false);
  });

  it('an error event whose status stops the walk (402) is 502 upstream_insufficient_credits before any byte, and costs nothing', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ status: 402, errorInBody: true });
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream: true, messages: [{ role: 'user', content: unique('out of credit') }] });
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_insufficient_credits' });
    expect(gw.stub.hits).toBe(1);
    const budget = await storedBudget(gw, 'user', t.userId);
    expect(budget).toMatchObject({ spent: 0n, reserved: 0n });
  });

  it('an error event after the first byte ends the stream as a failure: the SSE error event and [DONE], charged for what was produced, never cached', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ errorAfterChunks: 3 });
    const content = unique('cut by an error event');
    const body = { messages: [{ role: 'user', content }] };
    const { status, events } = await sse(gw, t.key, body);
    expect(status).toBe(200);
    expect(events).toHaveLength(5);
    expect(contentOf(events.slice(0, 3))).toBe('Mock reply ');
    expect(JSON.parse(events[3] ?? '{}')).toEqual({ error: expect.objectContaining({ type: 'upstream_error', code: 'upstream_error' }) });
    expect(events[4]).toBe('[DONE]');
    const [row] = await ledgerRows(gw, 'user', t.userId);
    expect(row?.outcome).not.toBe('ok');
    expect(row).toMatchObject({ cost_source: 'estimate', completion_tokens: producedTokens('Mock reply '.length) });
    expect(BigInt(row?.cost_nanos ?? 0)).toBeGreaterThan(0n);
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n);
    // Not cached: the same request reaches the upstream again.
    gw.stub.reset();
    await sse(gw, t.key, body);
    expect(gw.stub.hits).toBe(1);
  });

  // Some providers report a failure as an SSE frame named `event: error`, its data not an OpenAI error.
  const errorFrame = 'event: error\ndata: {"message":"Internal server error","type":"server_error"}\n\n';
  const chunkFrame = (content: string) =>
    `data: ${JSON.stringify({ id: 'c', object: 'chat.completion.chunk', created: 1, model: MINI, choices: [{ index: 0, delta: { content }, finish_reason: null }] })}\n\n`;

  it('an `event: error` frame as the first event is a failed attempt: retried, then 502, never relayed as a chunk, free', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`${errorFrame}data: [DONE]\n\n`);
      return true;
    };
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream: true, messages: [{ role: 'user', content: unique('event error first') }] });
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_error' });
    expect(gw.stub.hits).toBe(2);
    expect(await storedBudget(gw, 'user', t.userId)).toMatchObject({ spent: 0n, reserved: 0n });
  });

  it('an `event: error` frame after the first event ends the stream with the SSE error event, never cached', async () => {
    const t = await gw.tenants.create();
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`${chunkFrame('Hello')}${errorFrame}${chunkFrame(' world')}data: [DONE]\n\n`);
      return true;
    };
    const body = { messages: [{ role: 'user', content: unique('event error mid') }] };
    const { status, events } = await sse(gw, t.key, body);
    expect(status).toBe(200);
    expect(events).toHaveLength(3);
    expect(contentOf(events.slice(0, 1))).toBe('Hello');
    expect(JSON.parse(events[1] ?? '{}')).toEqual({ error: expect.objectContaining({ type: 'upstream_error', code: 'upstream_error' }) });
    expect(events[2]).toBe('[DONE]');
    gw.stub.reset();
    await sse(gw, t.key, body);
    expect(gw.stub.hits).toBe(1);
  });

  it('an error event after the first byte that reports usage is charged its usage.cost, as a JSON 200 with an error is', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.script = (_req, _body, res) => {
      const failed = {
        id: 'c',
        object: 'chat.completion.chunk',
        created: 1,
        model: MINI,
        choices: [{ index: 0, delta: { content: '' }, finish_reason: 'error' }],
        error: { code: 502, message: 'provider failed mid-generation' },
        usage: { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13, cost: 0.000007777 },
      };
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`${chunkFrame('partial')}${chunkFrame(' answer')}data: ${JSON.stringify(failed)}\n\ndata: [DONE]\n\n`);
      return true;
    };
    const { status, events } = await sse(gw, t.key, {});
    expect(status).toBe(200);
    expect(contentOf(events.slice(0, 2))).toBe('partial answer');
    expect(JSON.parse(events[2] ?? '{}')).toEqual({ error: expect.objectContaining({ type: 'upstream_error' }) });
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.status, r.cost_source, r.cost_nanos, r.prompt_tokens, r.completion_tokens])).toEqual([[502, 'upstream', '7777', 9, 4]]);
    expect(await storedBudget(gw, 'user', t.userId)).toMatchObject({ spent: 7777n, reserved: 0n });
  });

  it('an `event: error` frame after the first byte that reports usage is charged its usage.cost too', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const named = { message: 'provider failed mid-generation', usage: { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13, cost: 0.000007777 } };
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`${chunkFrame('partial')}event: error\ndata: ${JSON.stringify(named)}\n\ndata: [DONE]\n\n`);
      return true;
    };
    const { status, events } = await sse(gw, t.key, {});
    expect(status).toBe(200);
    expect(JSON.parse(events[1] ?? '{}')).toEqual({ error: expect.objectContaining({ type: 'upstream_error' }) });
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.status, r.cost_source, r.cost_nanos, r.prompt_tokens, r.completion_tokens])).toEqual([[502, 'upstream', '7777', 9, 4]]);
    expect(await storedBudget(gw, 'user', t.userId)).toMatchObject({ spent: 7777n, reserved: 0n });
  });

  it('a first stream event without choices is a failed attempt (bad response): retried, then 502', async () => {
    const t = await gw.tenants.create();
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`data: {"id":"c","object":"chat.completion.chunk","model":"${MINI}"}\n\n${chunkFrame('Hello')}data: [DONE]\n\n`);
      return true;
    };
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream: true, messages: [{ role: 'user', content: unique('no choices') }] });
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_bad_response' });
    expect(gw.stub.hits).toBe(2);
  });

  it('a JSON 200 that is an OpenRouter error is the failure its code names: 402 → 502 upstream_insufficient_credits, not retried', async () => {
    const t = await gw.tenants.create();
    gw.stub.configure({ status: 402, errorInBody: true });
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('credits') }] });
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_insufficient_credits' });
    expect(gw.stub.hits).toBe(1);
  });

  it('a JSON 200 with a top-level error and a choice finished as "error" is a failed attempt, never an answer, never cached', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ errorAfterChunks: 2 });
    const body = { messages: [{ role: 'user', content: unique('half an answer') }] };
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', body);
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe('upstream_error');
    expect(gw.stub.hits).toBe(2);
    // Each try reported the usage (and cost) of what it produced before failing: the upstream bills
    // it, so it is charged, as a stream cut by an error event is.
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.outcome, r.cost_source, r.completion_tokens])).toEqual([
      ['http', 'upstream', 2],
      ['http', 'upstream', 2],
    ]);
    const spent = rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n);
    expect(spent).toBeGreaterThan(0n);
    expect(await storedBudget(gw, 'user', t.userId)).toMatchObject({ spent, reserved: 0n });
    gw.stub.reset();
    const again = await t.api.post<Completion>('/v1/chat/completions', body);
    expect(again.status).toBe(200);
    expect(again.headers.get('x-gateway-cache')).toBe('miss');
    expect(gw.stub.hits).toBe(1);
  });

  // Before, only a top-level error was read: this answer was relayed as a 200 and charged.
  it('a JSON 200 whose choice finished as "error", the error inside the choice only, is a failed attempt too', async () => {
    const t = await gw.tenants.create();
    gw.stub.configure({ errorAfterChunks: 2, errorInChoice: true });
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('error in the choice') }] });
    expect(res.status).toBe(502);
    expect(res.body.error.code).toBe('upstream_error');
    expect(res.headers.get('x-gateway-cost-usd')).toBeNull();
    expect(gw.stub.hits).toBe(2);
  });

  it("an upstream 403 for flagged input is the caller's 400 with the upstream's reason (JSON and stream), not a credentials 502", async () => {
    const t = await gw.tenants.create();
    gw.stub.configure({ status: 403, flagged: true });
    for (const stream of [false, true]) {
      const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream, messages: [{ role: 'user', content: unique('flag me') }] });
      expect(res.status).toBe(400);
      expect(res.body.error).toMatchObject({ type: 'invalid_request_error', code: 'content_flagged' });
      expect(res.body.error.message).toContain('flagged for "harassment"');
      expect(res.body.error.message).not.toContain('sk-test-upstream-secret');
    }
    expect(gw.stub.hits).toBe(2);
    gw.stub.configure({ status: 403 });
    const other = await t.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('forbidden') }] });
    expect(other.status).toBe(502);
    expect(other.body.error.code).toBe('upstream_auth');
  });

  it('a 408 that survives retries is 504 upstream_timeout', async () => {
    const t = await gw.tenants.create();
    gw.stub.configure({ status: 408 });
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('slow') }] });
    expect(res.status).toBe(504);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_timeout' });
    expect(gw.stub.hits).toBe(2);
  });
});

describe.each(DRIVERS)('UPSTREAM_TIMEOUT_MS bounds each attempt from its start, keep-alives or not (%s driver)', (driver) => {
  let gw: TestGateway;
  let t: Tenant;

  beforeAll(async () => {
    // The drivers' timeouts (idle time, the same UPSTREAM_TIMEOUT_MS) never fire while keep-alives come.
    gw = await startTestGateway({ env: { ...FAST_RETRIES, UPSTREAM_DRIVER: driver, UPSTREAM_TIMEOUT_MS: '300', UPSTREAM_DEADLINE_MS: '1000' } });
    t = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  for (const stream of [false, true]) {
    it(`keep-alives only (${stream ? 'SSE comments' : 'whitespace before a JSON body'}) past the deadline are 504 upstream_timeout`, async () => {
      gw.stub.configure({ processingMs: 6000 });
      const started = performance.now();
      const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream, messages: [{ role: 'user', content: unique('processing') }] });
      const took = performance.now() - started;
      expect(res.status).toBe(504);
      expect(res.body.error.code).toBe('upstream_timeout');
      expect(took).toBeLessThan(3500);
      // Before, keep-alives held the first try until the deadline; now each try ends at UPSTREAM_TIMEOUT_MS.
      expect(gw.stub.hits).toBe(2);
    });
  }

  for (const stream of [false, true]) {
    it(`a 503 whose error body still trickles at the deadline is 504 upstream_timeout (${stream ? 'stream' : 'JSON'})`, async () => {
      gw.stub.script = (_req, _body, res) => {
        res.writeHead(503, { 'content-type': 'application/json' });
        // A byte every 100 ms: never idle long enough for the drivers' timeouts, only the attempt's bound ends it.
        const timer = setInterval(() => res.write(' '), 100);
        res.on('close', () => clearInterval(timer));
        return true;
      };
      const res = await t.api.post<ErrorBody>('/v1/chat/completions', { stream, messages: [{ role: 'user', content: unique('trickle') }] });
      expect(res.status).toBe(504);
      expect(res.body.error.code).toBe('upstream_timeout');
    });
  }

  it('an answer after keep-alives, within UPSTREAM_TIMEOUT_MS, is answered', async () => {
    gw.stub.configure({ processingMs: 150 });
    const res = await t.api.post<Completion>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('worth the wait') }] });
    expect(res.status).toBe(200);
    expect(res.body.choices[0]?.message.content).toMatch(/^Mock reply to: worth the wait/);
  });
});

describe('the model a call is priced as, and the one it shows', () => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...FAST_RETRIES, UPSTREAM_NATIVE_FALLBACK: 'true', BUDGET_LEASE_MS: '0' } });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const miniCost = (p: number, c: number) => {
    const price = gw.gateway.app.get(PricingService).priceOf(MINI);
    expect(price.source).not.toBe('fallback');
    return tokensCost(p, price.prompt) + tokensCost(c, price.completion);
  };

  it('an answer naming a dated version of the routed model is priced as the routed model, and shows the dated name', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ omitCost: true, answerModel: DATED });
    const res = await t.api.post<Completion>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('dated') }] });
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(DATED);
    expect(res.headers.get('x-gateway-model')).toBe(DATED);
    const expected = miniCost(res.body.usage.prompt_tokens, res.body.usage.completion_tokens);
    expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(expected));
    const [row] = await ledgerRows(gw, 'user', t.userId);
    expect(row).toMatchObject({ model: MINI, cost_source: 'pricing_table', cost_nanos: expected.toString() });
  });

  it('the same for a stream, and for the member of a native fallback chain that answered', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ omitCost: true, answerModel: DATED, models: { [SONNET]: { status: 503 } } });
    const streamed = await sse(gw, t.key, { stream_options: { include_usage: true } });
    expect(streamed.status).toBe(200);
    const chain = await t.api.post<Completion>('/v1/chat/completions', { task_type: 'code', messages: [{ role: 'user', content: unique('chain') }] });
    expect(chain.status).toBe(200);
    expect(chain.headers.get('x-gateway-model')).toBe(DATED);
    const rows = (await ledgerRows(gw, 'user', t.userId)).filter((r) => r.outcome === 'ok');
    expect(rows).toHaveLength(2);
    for (const row of rows) {
      expect(row).toMatchObject({ model: MINI, cost_source: 'pricing_table' });
      expect(BigInt(row.cost_nanos)).toBe(miniCost(row.prompt_tokens, row.completion_tokens));
    }
  });

  it('a cache hit of such an answer is counted under the routed model too, as its miss was (JSON and stream)', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ answerModel: DATED });
    const body = { model: 'auto', temperature: 0, messages: [{ role: 'user', content: unique('dated hit') }] };
    for (const cache of ['miss', 'hit']) {
      const res = await t.api.post<Completion>('/v1/chat/completions', body);
      expect(res.headers.get('x-gateway-cache')).toBe(cache);
      expect(res.headers.get('x-gateway-model')).toBe(DATED);
    }
    const replayed = await sse(gw, t.key, body);
    expect(replayed.headers.get('x-gateway-cache')).toBe('hit');
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const usage = await t.api.get<{ spend: Array<{ model: string; requests: number }> }>('/v1/usage');
    expect(usage.body.spend.map((s) => [s.model, s.requests])).toEqual([[MINI, 3]]);
  });

  // API.md: x-gateway-model is the model that answered. A single model's live stream showed the
  // routed name while its chunks, a JSON call and the stream's own cache replay all showed the
  // dated one: a replay did not carry the header its original did.
  it('a single-model stream answered under a dated name shows it live and replayed, as a JSON call does, priced as the routed model', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ omitCost: true, answerModel: DATED });
    // Named by the caller without fallbacks: asked alone, not as a native chain.
    const body = { model: MINI, temperature: 0, stream_options: { include_usage: true }, messages: [{ role: 'user', content: unique('dated stream') }] };
    const miss = await sse(gw, t.key, body);
    expect(miss.headers.get('x-gateway-cache')).toBe('miss');
    expect((JSON.parse(miss.events[0] ?? '{}') as { model: string }).model).toBe(DATED);
    expect(miss.headers.get('x-gateway-model')).toBe(DATED);
    const hit = await sse(gw, t.key, body);
    expect(hit.headers.get('x-gateway-cache')).toBe('hit');
    expect(hit.headers.get('x-gateway-model')).toBe(DATED);
    const json = await t.api.post<Completion>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: unique('dated json') }] });
    expect(json.headers.get('x-gateway-model')).toBe(DATED);
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows.map((r) => [r.model, r.cost_source])).toEqual([
      [MINI, 'pricing_table'],
      [MINI, 'cache'],
      [MINI, 'pricing_table'],
    ]);
    for (const row of rows.filter((r) => r.cost_source === 'pricing_table')) {
      expect(BigInt(row.cost_nanos)).toBe(miniCost(row.prompt_tokens, row.completion_tokens));
    }
  });

  it('an answer naming a model no header can carry is answered, and shows the model asked for (JSON and native stream)', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    gw.stub.configure({ answerModel: 'openai/gpt-4o-mini-模型', models: { [SONNET]: { status: 503 } } });
    const json = await t.api.post<Completion>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('odd name') }] });
    expect(json.status).toBe(200);
    expect(json.headers.get('x-gateway-model')).toBe(MINI);
    const streamed = await sse(gw, t.key, { task_type: 'code' });
    expect(streamed.status).toBe(200);
    expect(streamed.headers.get('x-gateway-model')).toBe(MINI);
    expect(streamed.events.at(-1)).toBe('[DONE]');
    expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n);
  });

  it('a stream whose sink cannot open still settles (releases) its reservation', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 1 });
    const completions = gw.gateway.app.get(CompletionService);
    const call: CompletionCall = {
      principal: {
        keyId: t.keyId,
        keyPrefix: t.key.slice(0, 8),
        userId: t.userId,
        departmentId: t.departmentId,
        role: 'user',
        cacheScope: 'user',
        expiresAt: undefined,
      },
      requestId: `sink-${Date.now()}`,
      body: { model: 'auto', stream: true, messages: [{ role: 'user', content: unique('broken sink') }] },
      taskType: undefined,
      door: 'chat',
      signal: new AbortController().signal,
      cacheControl: { read: false, write: false, ttlSeconds: undefined },
    };
    const sink: StreamSink = {
      open: (_meta: CompletionMeta) => {
        throw new TypeError('Invalid character in header content ["x-gateway-model"]');
      },
      event: () => undefined,
      close: () => undefined,
      closed: false,
    };
    await expect(completions.stream(call, sink)).rejects.toThrow(/Invalid character/);
    const budget = await storedBudget(gw, 'user', t.userId);
    expect(budget).toMatchObject({ reserved: 0n, spent: 0n });
    const rows = await ledgerRows(gw, 'user', t.userId);
    expect(rows).toHaveLength(1);
    expect(rows[0]?.outcome).not.toBe('ok');
  });
});
