import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { postSse, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

const SONNET = 'anthropic/claude-3.5-sonnet';
const MINI = 'openai/gpt-4o-mini';

interface ErrorBody {
  error: { message: string; type: string; code: string };
}

/** Retry delays kept small so the suite stays quick; the retry-after cap still allows 1 s. */
const FAST_RETRIES = { UPSTREAM_RETRY_BASE_MS: '10', UPSTREAM_RETRY_MAX_DELAY_MS: '40', UPSTREAM_RETRY_AFTER_MAX_MS: '2000', UPSTREAM_RETRY_ATTEMPTS: '2' };

/** A prompt no other test sends: every call here must reach the upstream, never the response cache. */
let prompts = 0;
const unique = (text: string) => `${text} #${++prompts}`;

/** Reads a whole SSE response as its `data:` payloads. */
function sse(gw: TestGateway, key: string, body: Record<string, unknown>): Promise<{ status: number; headers: Headers; events: string[] }> {
  return postSse(gw, key, { messages: [{ role: 'user', content: unique('one two three four five six seven') }], stream: true, ...body });
}

describe('fallbacks and retries against the stub upstream (gateway walks the chain)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: FAST_RETRIES });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const code = (extra: Record<string, unknown> = {}) =>
    alice.api.post<{ model: string; choices: unknown[] } & ErrorBody>('/v1/chat/completions', {
      messages: [{ role: 'user', content: unique('fix my bug') }],
      task_type: 'code',
      ...extra,
    });
  const sentModels = () => gw.stub.requests.map((r) => (r.body as { model: string }).model);

  it('primary 503 → the fallback answers, and the response says which model did', async () => {
    gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
    const { data, response } = await alice.openai.chat.completions
      .create({
        model: 'auto',
        messages: [{ role: 'user', content: unique('fix my bug') }],
        task_type: 'code',
      } as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
      .withResponse();
    expect(data.model).toBe(MINI);
    expect(response.headers.get('x-gateway-model')).toBe(MINI);
    expect(data.choices[0]?.message.content).toMatch(/^Mock reply to: fix my bug #\d+$/);
    // The primary was tried twice (UPSTREAM_RETRY_ATTEMPTS=2: 503 is transient), then the fallback once.
    expect(sentModels()).toEqual([SONNET, SONNET, MINI]);
  });

  it('every model failing → 502 carrying the last cause', async () => {
    gw.stub.configure({ models: { [SONNET]: { status: 503 }, [MINI]: { status: 500 } } });
    const res = await code();
    expect(res.status).toBe(502);
    expect(res.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_error' });
    expect(res.body.error.message).toContain(`upstream (${MINI}) failed with HTTP 500`);
    expect(sentModels()).toEqual([SONNET, SONNET, MINI, MINI]);
    expect(JSON.stringify(res.body)).not.toContain('sk-test-upstream-secret');
  });

  // Before, the typo was answered (and charged) by the rule's fallback: the same mistake was a 400
  // under a rule without fallbacks and a 200 from another model under one with them.
  it("a model the caller names that the upstream does not know is the caller's 400, not quietly the rule's fallback", async () => {
    const typo = 'openai/gpt-4o-mnii';
    gw.stub.configure({ models: { [typo]: { status: 404 } } });
    const res = await code({ model: typo });
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({ code: 'model_not_found', param: 'model' });
    expect(sentModels()).toEqual([typo]);
    // Fallbacks the caller named itself are its own choice: walked.
    gw.stub.reset();
    gw.stub.configure({ models: { [typo]: { status: 404 } } });
    const named = await code({ model: typo, models: [MINI] });
    expect(named.status).toBe(200);
    expect(named.body.model).toBe(MINI);
    expect(sentModels()).toEqual([typo, MINI]);
  });

  // OpenRouter answers an id it does not know with a 400 ("<id> is not a valid model ID"), not a
  // 404. Before, that 400 stopped the walk: a retired or misspelt model in the routing table was
  // the caller's 400 invalid_value and the rule's fallbacks were never tried.
  it("a table model OpenRouter does not know (its 400) falls back; every one unknown is a 502, not the caller's 400", async () => {
    gw.stub.configure({ models: { [SONNET]: { invalidModelId: true } } });
    const res = await code();
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(MINI);
    // Not retried: an unknown id stays unknown.
    expect(sentModels()).toEqual([SONNET, MINI]);
    gw.stub.reset();
    gw.stub.configure({ models: { [SONNET]: { invalidModelId: true }, [MINI]: { invalidModelId: true } } });
    const none = await code();
    expect(none.status).toBe(502);
    expect(none.body.error).toMatchObject({ type: 'upstream_error', code: 'upstream_error' });
    expect(none.body.error.message).toContain('does not know the model the routing table chose');
  });

  it("a model the caller names that OpenRouter does not know (its 400) is the caller's 400 model_not_found", async () => {
    const typo = 'openai/gpt-4o-mnii';
    gw.stub.configure({ models: { [typo]: { invalidModelId: true } } });
    const res = await code({ model: typo });
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({ code: 'model_not_found', param: 'model' });
    expect(sentModels()).toEqual([typo]);
  });

  it('429 with retry-after: 1 → waits for it, retries, and succeeds', async () => {
    gw.stub.configure({ status: 429, retryAfterSeconds: 1, failTimes: 1 });
    const res = await alice.api.post<{ model: string }>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('hi') }] });
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(MINI);
    expect(gw.stub.hits).toBe(2);
    const [first, second] = gw.stub.requests;
    // The retry went out no earlier than the upstream asked (1 s; timer slack tolerated).
    expect((second?.at ?? 0) - (first?.at ?? 0)).toBeGreaterThanOrEqual(950);
  });

  it("upstream 401/402/429 that survive retries are 502s with precise codes; 400 is the caller's, never retried", async () => {
    for (const [status, code, hits] of [
      [401, 'upstream_auth', 1],
      [402, 'upstream_insufficient_credits', 1],
      [429, 'upstream_rate_limited', 2],
    ] as const) {
      gw.stub.reset();
      gw.stub.configure({ status });
      const res = await alice.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('x') }] });
      expect(res).toMatchObject({ status: 502, body: { error: { type: 'upstream_error', code } } });
      expect(gw.stub.hits).toBe(hits);
    }
    gw.stub.reset();
    gw.stub.configure({ models: { [SONNET]: { status: 400 } } });
    const bad = await code();
    // The upstream's own code (the stub's for a 400) is relayed: it says what to fix.
    expect(bad).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_request' } } });
    // Neither retried nor sent to the fallback: another model would refuse the same request.
    expect(sentModels()).toEqual([SONNET]);
  });

  it('a stream whose primary fails before the first byte falls back, invisibly to the client', async () => {
    gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
    const { status, headers, events } = await sse(gw, alice.key, { task_type: 'code' });
    expect(status).toBe(200);
    expect(headers.get('x-gateway-model')).toBe(MINI);
    expect(events.at(-1)).toBe('[DONE]');
    const text = events
      .slice(0, -1)
      .map((e) => (JSON.parse(e) as { choices: Array<{ delta: { content?: string } }> }).choices[0]?.delta.content ?? '')
      .join('');
    expect(text).toMatch(/^Mock reply to: one two three four five six seven #\d+$/);
    expect(events.some((e) => e.includes('"error"'))).toBe(false);
  });

  it('a stream cut after 3 chunks ends with an SSE error event and [DONE], and is not retried after the first byte', async () => {
    gw.stub.configure({ cutAfterChunks: 3 });
    const { status, events } = await sse(gw, alice.key, { task_type: 'code' });
    expect(status).toBe(200);
    expect(events).toHaveLength(5);
    const [, , , errorEvent, done] = events;
    expect(events.slice(0, 3).every((e) => (JSON.parse(e) as { object?: string }).object === 'chat.completion.chunk')).toBe(true);
    expect(JSON.parse(errorEvent)).toMatchObject({ error: { type: 'upstream_error', code: 'upstream_error' } });
    expect(done).toBe('[DONE]');
    expect(gw.stub.hits).toBe(1);
  });

  it('the SDK reports a stream cut mid-way as an error, never as a whole answer', async () => {
    gw.stub.configure({ cutAfterChunks: 3 });
    const stream = await alice.openai.chat.completions.create({
      model: 'auto',
      messages: [{ role: 'user', content: unique('one two three four five') }],
      stream: true,
    });
    const consume = async () => {
      for await (const chunk of stream) void chunk;
    };
    await expect(consume()).rejects.toBeInstanceOf(OpenAI.APIError);
    expect(gw.stub.hits).toBe(1);
  });
});

/**
 * The shipped defaults scaled down 60×, same ratios: UPSTREAM_TIMEOUT_MS 60 000 and
 * UPSTREAM_DEADLINE_MS 120 000 (= UPSTREAM_RETRY_ATTEMPTS 2 × the timeout).
 */
const SCALED_DEFAULTS = { ...FAST_RETRIES, UPSTREAM_TIMEOUT_MS: '1000', UPSTREAM_DEADLINE_MS: '2000' };

// Before, a primary that hung got both its tries and spent the whole deadline (the fallback was
// never asked: 504), and one that sent only keep-alives (OpenRouter's, while a slow model thinks)
// was bounded by nothing but the deadline: keep-alives reset the drivers' idle timeouts.
describe.each(['undici', 'sdk'] as const)('a primary that does not answer in time hands over to its fallback (%s driver)', (driver) => {
  let gw: TestGateway;
  let carol: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...SCALED_DEFAULTS, UPSTREAM_DRIVER: driver } });
    carol = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const sentModels = () => gw.stub.requests.map((r) => (r.body as { model: string }).model);

  for (const [primary, faults] of [
    ['hangs', { hangMs: 30_000 }],
    ['sends only keep-alive whitespace before its JSON body', { processingMs: 30_000 }],
  ] as const) {
    it(`a primary that ${primary}: the fallback answers within the deadline`, async () => {
      gw.stub.configure({ models: { [SONNET]: faults } });
      const started = performance.now();
      const res = await carol.api.post<{ model: string; choices: Array<{ message: { content: string } }> } & ErrorBody>('/v1/chat/completions', {
        messages: [{ role: 'user', content: unique('fix my bug') }],
        task_type: 'code',
      });
      const took = performance.now() - started;
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.headers.get('x-gateway-model')).toBe(MINI);
      expect(res.body.choices[0]?.message.content).toMatch(/^Mock reply to: fix my bug #\d+$/);
      // The primary had one try (UPSTREAM_TIMEOUT_MS, here also half the deadline), not two.
      expect(sentModels()).toEqual([SONNET, MINI]);
      expect(took).toBeLessThan(2000);
    });
  }

  it('a streaming primary that sends only ": OPENROUTER PROCESSING" comments: the fallback streams the answer', async () => {
    gw.stub.configure({ models: { [SONNET]: { processingMs: 30_000 } } });
    const started = performance.now();
    const { status, headers, events, text } = await postSse(gw, carol.key, {
      messages: [{ role: 'user', content: unique('fix my bug') }],
      task_type: 'code',
      stream: true,
    });
    const took = performance.now() - started;
    expect(status, text).toBe(200);
    expect(headers.get('x-gateway-model')).toBe(MINI);
    expect(events.at(-1)).toBe('[DONE]');
    expect(events.some((e) => e.includes('"error"'))).toBe(false);
    expect(sentModels()).toEqual([SONNET, MINI]);
    expect(took).toBeLessThan(2000);
  });
});

describe('OpenRouter native fallback and the total deadline', () => {
  let gw: TestGateway;
  let bob: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({
      env: { ...FAST_RETRIES, UPSTREAM_NATIVE_FALLBACK: 'true', UPSTREAM_RETRY_ATTEMPTS: '1', UPSTREAM_DEADLINE_MS: '800', UPSTREAM_TIMEOUT_MS: '5000' },
    });
    bob = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const code = () =>
    bob.api.post<{ model: string } & ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('x') }], task_type: 'code' });

  it('sends the chain once as models + route: "fallback"; OpenRouter\'s pick is the answering model', async () => {
    gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
    const res = await code();
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(MINI);
    expect(res.headers.get('x-gateway-model')).toBe(MINI);
    expect(gw.stub.hits).toBe(1);
    expect(gw.stub.requests[0]?.body).toMatchObject({ model: SONNET, models: [SONNET, MINI], route: 'fallback' });
  });

  it('walks the chain itself when the native request fails as a whole', async () => {
    // Both models fail once (inside the native request), then answer when asked one by one.
    gw.stub.configure({ models: { [SONNET]: { status: 503, failTimes: 1 }, [MINI]: { status: 503, failTimes: 1 } } });
    const res = await code();
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(SONNET);
    expect(gw.stub.requests.map((r) => ('models' in (r.body as object) ? 'native' : (r.body as { model: string }).model))).toEqual(['native', SONNET]);
  });

  it('streams through native fallback with the answering model in the header', async () => {
    gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
    const { status, headers, events } = await sse(gw, bob.key, { task_type: 'code' });
    expect(status).toBe(200);
    expect(headers.get('x-gateway-model')).toBe(MINI);
    expect(events.at(-1)).toBe('[DONE]');
    expect(gw.stub.hits).toBe(1);
  });

  const sent = () => gw.stub.requests.map((r) => ('models' in (r.body as object) ? 'native' : (r.body as { model: string }).model));

  it('walks the chain itself when OpenRouter refuses the native request over a table model it does not know', async () => {
    // OpenRouter checks every id of `models` first: one unknown refuses the whole request (400).
    gw.stub.configure({ models: { [SONNET]: { invalidModelId: true } } });
    const res = await code();
    expect(res.status).toBe(200);
    expect(res.body.model).toBe(MINI);
    expect(sent()).toEqual(['native', SONNET, MINI]);
  });

  // Before, the caller's model and the rule's fallbacks went out as one native chain: OpenRouter
  // walked past the typo and the fallback answered (and was charged), where without native
  // fallback the same request was the caller's 400.
  it("a typo'd model the caller names is its 400 model_not_found, never answered by the rule's fallback", async () => {
    const typo = 'openai/gpt-4o-mnii';
    for (const faults of [{ status: 404 }, { invalidModelId: true }]) {
      gw.stub.reset();
      gw.stub.configure({ models: { [typo]: faults } });
      const res = await bob.api.post<{ model: string } & ErrorBody>('/v1/chat/completions', {
        messages: [{ role: 'user', content: unique('fix my bug') }],
        task_type: 'code',
        model: typo,
      });
      expect(res.status).toBe(400);
      expect(res.body.error).toMatchObject({ code: 'model_not_found', param: 'model' });
      expect(sent()).toEqual([typo]);
    }
  });

  it('still sends fallbacks the caller named as one native chain, and walks them when it is refused', async () => {
    const typo = 'openai/gpt-4o-mnii';
    const named = () =>
      bob.api.post<{ model: string } & ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('x') }], model: typo, models: [MINI] });
    gw.stub.configure({ models: { [typo]: { status: 404 } } });
    const walked = await named();
    expect(walked.status).toBe(200);
    expect(walked.body.model).toBe(MINI);
    expect(sent()).toEqual(['native']);
    gw.stub.reset();
    gw.stub.configure({ models: { [typo]: { invalidModelId: true } } });
    const refused = await named();
    expect(refused.status).toBe(200);
    expect(refused.body.model).toBe(MINI);
    expect(sent()).toEqual(['native', typo, MINI]);
  });

  it('gives up at the total deadline even when one attempt may take longer (504)', async () => {
    gw.stub.configure({ hangMs: 10_000 });
    const started = performance.now();
    const res = await code();
    expect(res).toMatchObject({ status: 504, body: { error: { type: 'upstream_error', code: 'upstream_timeout' } } });
    expect(performance.now() - started).toBeLessThan(2000);
    // UPSTREAM_TIMEOUT_MS is beyond the deadline here: the native request had all of it.
    expect(sent()).toEqual(['native']);
  });
});

// Each attempt is bounded by UPSTREAM_TIMEOUT_MS (or what is left of the deadline), not by a share
// of the deadline: a share cut answers that a model really needs longer for (48 s of a 60 s
// timeout, with 120 s ÷ 3 plans under native fallback), and made raising UPSTREAM_TIMEOUT_MS useless.
describe('an attempt may take up to UPSTREAM_TIMEOUT_MS (shipped defaults scaled 60×)', () => {
  const sent = (gw: TestGateway) => gw.stub.requests.map((r) => ('models' in (r.body as object) ? 'native' : (r.body as { model: string }).model));
  const ask = (tenant: Tenant) =>
    tenant.api.post<{ model: string } & ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: unique('long answer') }], task_type: 'code' });

  describe('with native fallback', () => {
    let gw: TestGateway;
    let carol: Tenant;
    beforeAll(async () => {
      gw = await startTestGateway({ env: { ...SCALED_DEFAULTS, UPSTREAM_NATIVE_FALLBACK: 'true' } });
      carol = await gw.tenants.create();
    });
    afterAll(async () => {
      await gw?.close();
    });
    beforeEach(() => gw.stub.reset());

    it('an answer that takes 80% of UPSTREAM_TIMEOUT_MS arrives from the one native request', async () => {
      gw.stub.configure({ latencyMs: 800 });
      const res = await ask(carol);
      expect({ status: res.status, sent: sent(gw) }).toEqual({ status: 200, sent: ['native'] });
    });

    it('a native request that times out hands over to the fallback alone: its primary, most likely what it waited on, is asked last', async () => {
      gw.stub.configure({ models: { [SONNET]: { hangMs: 30_000 } } });
      const started = performance.now();
      const res = await ask(carol);
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.body.model).toBe(MINI);
      expect(sent(gw)).toEqual(['native', MINI]);
      expect(performance.now() - started).toBeLessThan(2000);
    });
  });

  // OpenRouter walks a chain past a member that fails, so a chain that timed out may have waited
  // on its fallback after the primary failed fast: the primary, asked last, still answers when
  // the deadline leaves time for it (at the shipped 2 × the timeout it does not: 504).
  describe('with native fallback and a deadline of three attempts', () => {
    let gw: TestGateway;
    let carol: Tenant;
    beforeAll(async () => {
      gw = await startTestGateway({ env: { ...SCALED_DEFAULTS, UPSTREAM_NATIVE_FALLBACK: 'true', UPSTREAM_DEADLINE_MS: '3500' } });
      carol = await gw.tenants.create();
    });
    afterAll(async () => {
      await gw?.close();
    });
    beforeEach(() => gw.stub.reset());

    it('a primary rate limited for a moment, then a hung fallback: the primary alone answers last', async () => {
      gw.stub.configure({ models: { [SONNET]: { status: 429, failTimes: 1 }, [MINI]: { hangMs: 30_000 } } });
      const res = await ask(carol);
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.body.model).toBe(SONNET);
      expect(sent(gw)).toEqual(['native', MINI, SONNET]);
    });
  });

  describe('UPSTREAM_TIMEOUT_MS raised for a model whose answers take longer than the default', () => {
    let gw: TestGateway;
    let carol: Tenant;
    beforeAll(async () => {
      // 1000 (60 s) raised to 1500 (90 s) because answers take 1200 (72 s); the deadline stays 2000.
      gw = await startTestGateway({ env: { ...SCALED_DEFAULTS, UPSTREAM_TIMEOUT_MS: '1500' } });
      carol = await gw.tenants.create();
    });
    afterAll(async () => {
      await gw?.close();
    });
    beforeEach(() => gw.stub.reset());

    it('lets the primary answer in 1200 ms', async () => {
      gw.stub.configure({ latencyMs: 1200 });
      const res = await ask(carol);
      expect({ status: res.status, sent: sent(gw) }).toEqual({ status: 200, sent: [SONNET] });
    });
  });
});
