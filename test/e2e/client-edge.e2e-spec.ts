import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { BudgetService } from '../../src/budget/budget.service.js';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

/**
 * Edges of the client API a reviewer found open: token limits that bypassed the reservation,
 * a rule's cache policy never applied, model ids a header cannot carry, `model: null`, a URL
 * Fastify cannot decode, and /v1/models listing models the caller may not name.
 */
type ErrorBody = { error: { message: string; type: string; code: string; param: string | null } };
type Rule = { task_type: string; model: string; fallbacks: string[]; max_tokens?: number; cache?: { enabled: boolean; ttl_seconds?: number } };
type Table = { version: number; default_task_type: string; rules: Rule[]; allowed_models?: string[] | null };
type ModelList = { data: Array<{ id: string }>; task_types: Array<{ task_type: string; model: string }> };

const MINI = 'openai/gpt-4o-mini';
const SONNET = 'anthropic/claude-3.5-sonnet';

describe('client edges (PGlite, stub upstream)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  let original: Table;

  const prompt = (tag: string) => `${tag} ${randomBytes(4).toString('hex')}`;
  const chat = (body: Record<string, unknown>, headers: Record<string, string> = {}) =>
    alice.api.post<ErrorBody>('/v1/chat/completions', { messages: [{ role: 'user', content: prompt('edge') }], ...body }, headers);
  const current = async () => (await gw.admin.get<Table>('/admin/routing')).body;
  const putTable = async (change: Partial<Table>) => {
    const now = await current();
    const res = await gw.admin.put<Table>('/admin/routing', {
      version: now.version,
      default_task_type: change.default_task_type ?? now.default_task_type,
      rules: change.rules ?? now.rules,
      allowed_models: change.allowed_models === undefined ? (now.allowed_models ?? null) : change.allowed_models,
    });
    expect(res.status).toBe(200);
    return res.body;
  };
  const lastUpstreamBody = () => gw.stub.requests.at(-1)?.body as Record<string, unknown> | undefined;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
    original = await current();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });
  afterEach(async () => {
    vi.restoreAllMocks();
    // Every test starts from the seeded rules, whatever the one before changed.
    await putTable({ rules: original.rules, allowed_models: null });
  });

  // Before, a JSON body sent as a form (curl -d's default) was parsed as one and answered "missing
  // 'messages'", text/plain as "not a JSON object", and an admin route took a form body.
  it.each(['application/x-www-form-urlencoded', 'text/plain'])('answers a body sent as %s with 415 unsupported_media_type, on /v1 and /admin', async (type) => {
    const body = JSON.stringify({ messages: [{ role: 'user', content: 'hi' }] });
    const chatAnswer = await alice.api.request<ErrorBody>('POST', '/v1/chat/completions', body, { 'content-type': type });
    expect(chatAnswer).toMatchObject({ status: 415, body: { error: { code: 'unsupported_media_type', type: 'invalid_request_error' } } });
    const admin = await gw.admin.request<ErrorBody>('POST', '/admin/departments', type === 'text/plain' ? body : 'name=FromAForm', { 'content-type': type });
    expect(admin).toMatchObject({ status: 415, body: { error: { code: 'unsupported_media_type' } } });
    expect(gw.stub.hits).toBe(0);
    // A request without a body is not refused for the type it names (fetch sends text/plain with
    // body: '', curl -d '' a form type): nothing is parsed.
    const bob = await gw.tenants.create();
    const revoke = await fetch(`${gw.url}/admin/keys/${bob.keyId}`, { method: 'DELETE', headers: { authorization: `Bearer ${gw.adminKey}`, 'content-type': type }, body: '' });
    expect(revoke.status).toBe(200);
  });

  describe('token limits (API.md: the cap is sent and reserved for)', () => {
    it('never sends the upstream a limit above the one the budget reserved for, under either name', async () => {
      const budget = gw.gateway.app.get(BudgetService);
      const reserved: number[] = [];
      const worstCase = budget.worstCase.bind(budget);
      vi.spyOn(budget, 'worstCase').mockImplementation((call, route) => {
        reserved.push(route.maxTokens);
        return worstCase(call, route);
      });
      const bodies: Array<Record<string, unknown>> = [
        { max_tokens: 100_000, max_completion_tokens: 10 },
        { max_tokens: 100_000, max_completion_tokens: null },
        { max_tokens: null, max_completion_tokens: 100_000 },
        { max_tokens: 10, max_completion_tokens: 100_000 },
        { max_tokens: 100_000 },
        { max_completion_tokens: 100_000 },
        { max_tokens: null, max_completion_tokens: null },
        {},
      ];
      for (const [i, extra] of bodies.entries()) {
        for (const stream of [false, true]) {
          const label = `${JSON.stringify(extra)} stream=${stream}`;
          const before = reserved.length;
          const res = await chat({ model: 'auto', stream, ...extra });
          expect(res.status, label).toBe(200);
          expect(reserved.length, label).toBe(before + 1);
          const held = reserved.at(-1) ?? 0;
          const sent = lastUpstreamBody() ?? {};
          const limits = (['max_tokens', 'max_completion_tokens'] as const).filter((f) => sent[f] !== undefined).map((f) => sent[f]);
          expect(limits.length, label).toBeGreaterThan(0);
          for (const limit of limits) {
            expect(typeof limit, label).toBe('number');
            expect(limit as number, label).toBeLessThanOrEqual(held);
          }
          // The rule's cap (DEFAULT_MAX_TOKENS, 1024) and the smaller of two requests both hold.
          expect(held, label).toBe(i === 0 || i === 3 ? 10 : 1024);
          // A null limit is not a limit asked for: it is not forwarded.
          expect(sent.max_tokens, label).not.toBeNull();
          expect(sent.max_completion_tokens, label).not.toBeNull();
        }
      }
    });
  });

  describe("a routing rule's cache policy", () => {
    const cacheOf = (res: HttpResult) => res.headers.get('x-gateway-cache');

    it('enabled: false bypasses the cache for the rule (same request twice, no hit)', async () => {
      await putTable({ rules: original.rules.map((r) => (r.task_type === 'general' ? { ...r, cache: { enabled: false } } : r)) });
      const content = prompt('rule-off');
      const ask = () => alice.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content }] });
      const first = await ask();
      const second = await ask();
      expect([first.status, second.status]).toEqual([200, 200]);
      expect([cacheOf(first), cacheOf(second)]).toEqual(['bypass', 'bypass']);
      expect(gw.stub.hits).toBe(2);
      // Another rule, without a policy, still caches.
      const other = prompt('rule-on');
      const code = () => alice.api.post('/v1/chat/completions', { model: 'auto', task_type: 'code', messages: [{ role: 'user', content: other }] });
      expect(cacheOf(await code())).toBe('miss');
      expect(cacheOf(await code())).toBe('hit');
    });

    it("ttl_seconds is the entry's lifetime, and a request's x-gateway-cache-ttl cannot lengthen it", async () => {
      await putTable({ rules: original.rules.map((r) => (r.task_type === 'general' ? { ...r, cache: { enabled: true, ttl_seconds: 1 } } : r)) });
      const content = prompt('rule-ttl');
      const ask = () => alice.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content }] }, { 'x-gateway-cache-ttl': '3600' });
      expect(cacheOf(await ask())).toBe('miss');
      expect(cacheOf(await ask())).toBe('hit');
      // Gone after the rule's second, not the hour asked for (nor the default 300 s).
      await pollUntil(async () => expect(cacheOf(await ask())).toBe('miss'), 5000, 200);
    });
  });

  describe('model ids', () => {
    it('refuses a model id outside printable ASCII with 400 before anything is charged', async () => {
      for (const model of [`${MINI}-模型`, `${MINI}\u00a0`, 'has space']) {
        const res = await chat({ model });
        expect(res.status, model).toBe(400);
        expect(res.body.error, model).toMatchObject({ type: 'invalid_request_error', code: 'invalid_value', param: 'model' });
      }
      const listed = await chat({ model: MINI, models: [MINI, 'anthropic/模型'] });
      expect(listed.status).toBe(400);
      expect(listed.body.error).toMatchObject({ code: 'invalid_value', param: 'models' });
      expect(gw.stub.hits).toBe(0);
    });

    it('treats "model": null like an absent model: routing decides', async () => {
      const res = await chat({ model: null, task_type: 'code' });
      expect(res.status).toBe(200);
      expect(res.headers.get('x-gateway-model')).toBe(SONNET);
      expect(lastUpstreamBody()?.model).toBe(SONNET);
      // With named models restricted, null is not a name to refuse.
      await putTable({ allowed_models: [MINI] });
      const restricted = await chat({ model: null });
      expect(restricted.status).toBe(200);
      expect(restricted.headers.get('x-gateway-model')).toBe(MINI);
    });
  });

  describe('/v1/complete', () => {
    it('writes cost_usd as a plain decimal however small (API.md: money is a decimal number)', async () => {
      // The cheapest seeded model and a short answer: a cost below 1e-6, which JSON.stringify of a
      // number would write as 1.5e-7.
      gw.stub.configure({ completionTokens: 1 });
      const res = await fetch(`${gw.url}/v1/complete`, {
        method: 'POST',
        headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json', 'cache-control': 'no-cache' },
        body: JSON.stringify({ prompt: prompt('cheap'), model: 'meta-llama/llama-3.1-8b-instruct', max_tokens: 5 }),
      });
      expect(res.status).toBe(200);
      const text = await res.text();
      const written = /"cost_usd":([^,}]+)/.exec(text)?.[1];
      expect(written).toMatch(/^0\.\d+$/);
      expect(Number(written)).toBeGreaterThan(0);
      expect(Number(written)).toBeLessThan(1e-6);
      expect(written).toBe(res.headers.get('x-gateway-cost-usd'));
    });

    it('refuses a model id a header cannot carry', async () => {
      const res = await alice.api.post<ErrorBody>('/v1/complete', { prompt: prompt('model'), model: 'openai/gpt-4o-mini-模型' });
      expect(res.status).toBe(400);
      expect(res.body.error).toMatchObject({ code: 'invalid_value', param: 'model' });
      expect(gw.stub.hits).toBe(0);
    });
  });

  describe('a URL Fastify cannot decode', () => {
    it('is answered in the OpenAI envelope, with x-request-id', async () => {
      const res = await fetch(`${gw.url}/v1/jobs/%zz`, { headers: { authorization: `Bearer ${alice.key}`, 'x-request-id': 'bad-url-1' } });
      expect(res.status).toBe(400);
      expect(res.headers.get('x-request-id')).toBe('bad-url-1');
      expect(res.headers.get('content-type')).toContain('application/json');
      const body = (await res.json()) as ErrorBody & { statusCode?: unknown };
      expect(body.statusCode).toBeUndefined();
      expect(body.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_value' });
      expect(body.error.message).not.toContain('%zz');

      const generated = await fetch(`${gw.url}/admin/keys/%E0%A4%A`, { headers: { authorization: `Bearer ${gw.adminKey}` } });
      expect(generated.status).toBe(400);
      expect(generated.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
      expect(((await generated.json()) as ErrorBody).error.code).toBe('invalid_value');
    });
  });

  describe("a client's `Connection: close`", () => {
    /** One raw HTTP/1.1 request saying `connection: close`: the response head, and whether the server closed the socket within 1 s of the answer. */
    function closingRequest(body: Record<string, unknown>): Promise<{ head: string; closedByServer: boolean }> {
      const { hostname, port } = new URL(gw.url);
      const json = JSON.stringify(body);
      return new Promise((resolve, reject) => {
        const socket = connect(Number(port), hostname);
        let text = '';
        let timer: NodeJS.Timeout | undefined;
        const finish = (closedByServer: boolean) => {
          clearTimeout(timer);
          socket.destroy();
          resolve({ head: (text.split('\r\n\r\n')[0] ?? '').toLowerCase(), closedByServer });
        };
        socket.on('error', reject);
        socket.on('data', (d: Buffer) => {
          text += d.toString();
          if (text.includes('[DONE]') || text.includes('"object":"chat.completion"')) timer ??= setTimeout(() => finish(false), 1000);
        });
        socket.on('end', () => finish(true));
        socket.write(
          `POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${alice.key}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: ${Buffer.byteLength(json)}\r\n\r\n${json}`,
        );
      });
    }

    // A stream forced `connection: keep-alive` over it, and kept the socket open.
    it('is honoured on a stream as on a JSON answer: said in the answer, and the socket closed after it', async () => {
      const json = await closingRequest({ messages: [{ role: 'user', content: prompt('json close') }] });
      expect(json).toMatchObject({ closedByServer: true });
      expect(json.head).toContain('connection: close');
      const sse = await closingRequest({ stream: true, messages: [{ role: 'user', content: prompt('sse close') }] });
      expect(sse).toMatchObject({ closedByServer: true });
      expect(sse.head).toContain('connection: close');
      expect(sse.head).toContain('content-type: text/event-stream');
      // Without it, a stream's connection stays open for the next request.
      const kept = await fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ stream: true, messages: [{ role: 'user', content: prompt('sse kept') }] }),
      });
      await kept.text();
      expect(kept.headers.get('connection')).toBe('keep-alive');
    });
  });

  describe('/v1/models', () => {
    it('lists only the models the caller may name when the table restricts them', async () => {
      const open = await alice.api.get<ModelList>('/v1/models');
      expect(open.body.data.map((m) => m.id)).toEqual(expect.arrayContaining(['auto', MINI, SONNET]));

      await putTable({ allowed_models: [MINI, 'openai/gpt-4o'] });
      const res = await alice.api.get<ModelList>('/v1/models');
      expect(res.status).toBe(200);
      expect(res.body.data.map((m) => m.id).sort()).toEqual(['auto', MINI, 'openai/gpt-4o'].sort());
      // The task types (reached through auto) are still all there.
      expect(res.body.task_types.map((t) => t.task_type)).toEqual(original.rules.map((r) => r.task_type));
      // And what it lists can be named.
      for (const { id } of res.body.data) expect((await chat({ model: id })).status, id).toBe(200);
    });
  });
});
