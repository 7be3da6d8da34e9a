import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ledgerRows, storedBudget } from '../integration/budget-support.js';
import { pollUntil, postSse, startTestGateway, type TestGateway } from '../support/gateway.js';

// Both upstream drivers (undici, the default; the openai SDK, the reference) must give the caller
// the same answer to the same upstream behaviour. Every scenario runs under each. Replies no stub
// fault describes come from the stub's `script`.

const DRIVERS = ['undici', 'sdk'] as const;
const MINI = 'openai/gpt-4o-mini';
const unique = (text: string) => `${text} ${randomBytes(4).toString('hex')}`;

interface ErrorBody {
  error: { message: string; type: string; code: string };
}
interface Completion {
  choices: Array<{ message: { content: string } }>;
}

function chunk(model: string, delta: Record<string, unknown>, finish: string | null): string {
  return `data: ${JSON.stringify({ id: 'chatcmpl-s', object: 'chat.completion.chunk', created: 0, model, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
}

function usageChunk(model: string): string {
  const usage = { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8, cost: 0.000002 };
  return `data: ${JSON.stringify({ id: 'chatcmpl-s', object: 'chat.completion.chunk', created: 0, model, choices: [], usage })}\n\n`;
}

function completionJson(model: string, content: string, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({
    id: 'chatcmpl-j',
    object: 'chat.completion',
    created: 0,
    model,
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cost: 0.000002 },
    ...extra,
  });
}

/** The text the caller received: the content deltas of its events, in order. */
function contentOf(events: string[]): string {
  return events
    .filter((e) => e !== '[DONE]')
    .map((e) => (JSON.parse(e) as { choices?: Array<{ delta?: { content?: string } }> }).choices?.[0]?.delta?.content ?? '')
    .join('');
}

const hasErrorEvent = (events: string[]) => events.some((e) => e !== '[DONE]' && (JSON.parse(e) as { error?: unknown }).error != null);

describe.each(DRIVERS)('upstream driver parity (%s driver)', (driver) => {
  let gw: TestGateway;
  const saved = { org: process.env.OPENAI_ORG_ID, project: process.env.OPENAI_PROJECT_ID, custom: process.env.OPENAI_CUSTOM_HEADERS };

  beforeAll(async () => {
    // An operator environment that also holds OpenAI settings (a shared .env, a CI runner).
    process.env.OPENAI_ORG_ID = 'org-operator-private';
    process.env.OPENAI_PROJECT_ID = 'proj-operator-private';
    process.env.OPENAI_CUSTOM_HEADERS = 'X-Internal-Token: internal-secret-token\nAuthorization: Bearer sk-operator-own\nX-Title: operator title';
    gw = await startTestGateway({
      env: {
        UPSTREAM_DRIVER: driver,
        UPSTREAM_TIMEOUT_MS: '500',
        UPSTREAM_DEADLINE_MS: '8000',
        UPSTREAM_RETRY_ATTEMPTS: '2',
        UPSTREAM_RETRY_BASE_MS: '1',
        UPSTREAM_RETRY_MAX_DELAY_MS: '5',
        BUDGET_LEASE_MS: '0',
      },
    });
  });
  afterAll(async () => {
    for (const [name, value] of [
      ['OPENAI_ORG_ID', saved.org],
      ['OPENAI_PROJECT_ID', saved.project],
      ['OPENAI_CUSTOM_HEADERS', saved.custom],
    ] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  describe('streams', () => {
    it('SSE keep-alive comments before the first event (within UPSTREAM_TIMEOUT_MS) are no event: the answer after them arrives', async () => {
      // OpenRouter sends ": OPENROUTER PROCESSING" every few hundred ms while a slow model thinks.
      // They do not extend UPSTREAM_TIMEOUT_MS, which bounds the wait for the first event (fallback.e2e-spec.ts).
      gw.stub.configure({ processingMs: 300 });
      const t = await gw.tenants.create();
      const content = unique('slow thinker');
      const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content }] });
      expect(status, text).toBe(200);
      expect(hasErrorEvent(events), text).toBe(false);
      expect(contentOf(events)).toBe(`Mock reply to: ${content}`);
      expect(events.at(-1)).toBe('[DONE]');
      expect(gw.stub.hits).toBe(1);
    });

    it('a stream that ends with [DONE] after its content, without a finish_reason, is complete and charged its usage', async () => {
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(
          chunk(model, { role: 'assistant', content: '' }, null) +
            chunk(model, { content: 'hello ' }, null) +
            chunk(model, { content: 'world' }, null) +
            usageChunk(model) +
            'data: [DONE]\n\n',
        );
        return true;
      };
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: unique('no finish') }] });
      expect(status).toBe(200);
      expect(hasErrorEvent(events), text).toBe(false);
      expect(contentOf(events)).toBe('hello world');
      expect(events.at(-1)).toBe('[DONE]');
      await pollUntil(async () => expect(await ledgerRows(gw, 'user', t.userId)).toHaveLength(1));
      expect((await ledgerRows(gw, 'user', t.userId))[0]).toMatchObject({ outcome: 'ok', cost_source: 'upstream' });
    });

    it('a stream that ends cleanly after its finish_reason but before [DONE] is a cut: an error event, recorded as cut, never cached', async () => {
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        // Close-delimited body (no chunked encoding, no length): a dropped connection looks like a clean end.
        res.writeHead(200, { 'content-type': 'text/event-stream', connection: 'close' });
        res.useChunkedEncodingByDefault = false;
        res.end(chunk(model, { role: 'assistant', content: '' }, null) + chunk(model, { content: 'hello' }, null) + chunk(model, {}, 'stop'));
        return true;
      };
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const request = { model: MINI, stream: true, messages: [{ role: 'user', content: unique('no done') }] };
      const { status, events, text } = await postSse(gw, t.key, request);
      expect(status).toBe(200);
      expect(contentOf(events.slice(0, 2))).toBe('hello');
      // The stream broke off before [DONE]: the SSE error event, then [DONE].
      expect(hasErrorEvent(events), text).toBe(true);
      expect(events.at(-1)).toBe('[DONE]');
      await pollUntil(async () => expect((await ledgerRows(gw, 'user', t.userId)).at(-1)?.outcome).toBe('cut'));
      // Not stored: the same request asks the upstream again (which now answers in full).
      gw.stub.script = undefined;
      const again = await postSse(gw, t.key, request);
      expect(again.headers.get('x-gateway-cache')).not.toBe('hit');
      expect(gw.stub.hits).toBe(2);
    });

    it('a stream answered with [DONE] before any event is 502 upstream_bad_response (as JSON without an answer)', async () => {
      gw.stub.configure({ emptyAnswer: true });
      const t = await gw.tenants.create();
      const res = await t.api.post<ErrorBody>('/v1/chat/completions', { model: MINI, stream: true, messages: [{ role: 'user', content: unique('empty') }] });
      expect(res.status).toBe(502);
      expect(res.body.error.code).toBe('upstream_bad_response');
    });

    it('a stream whose first event is an error given as a string (`{"error":"…"}`) is a failed attempt, retried, never relayed as a 200', async () => {
      gw.stub.script = (_req, _body, res) => {
        if (gw.stub.hits > 1) return false; // the stub answers the retry
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end('data: {"error":"provider overloaded"}\n\ndata: [DONE]\n\n');
        return true;
      };
      const t = await gw.tenants.create();
      const content = unique('string error');
      const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content }] });
      expect(status).toBe(200);
      expect(text).not.toContain('provider overloaded');
      expect(contentOf(events)).toBe(`Mock reply to: ${content}`);
      expect(events.at(-1)).toBe('[DONE]');
      expect(gw.stub.hits).toBe(2);
    });

    it('an error given as a string mid-stream ends the stream with an error event, not as content', async () => {
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(
          chunk(model, { role: 'assistant', content: '' }, null) +
            chunk(model, { content: 'half' }, null) +
            'data: {"error":"provider overloaded"}\n\ndata: [DONE]\n\n',
        );
        return true;
      };
      const t = await gw.tenants.create();
      const { status, events, text } = await postSse(gw, t.key, {
        model: MINI,
        stream: true,
        messages: [{ role: 'user', content: unique('string error later') }],
      });
      expect(status).toBe(200);
      expect(text).not.toContain('provider overloaded');
      expect(contentOf(events.slice(0, 2))).toBe('half');
      const error = JSON.parse(events.at(-2) ?? '{}') as ErrorBody;
      expect(error.error.code).toBe('upstream_error');
      expect(events.at(-1)).toBe('[DONE]');
    });

    // An event framed like a JSON object but broken inside (here a trailing comma). The undici
    // driver once checked only its first and last characters: it relayed the broken text as a
    // chunk, recorded the stream as ok and stored it for idempotent replay, where the SDK driver
    // ended the stream as a bad response. Every event is parsed by both drivers now.
    const BROKEN = '{"id":"chatcmpl-s","choices":[{"index":0,"delta":{"content":"a"}},]}';

    it('an event mid-stream that is not JSON is never relayed: an upstream_bad_response error event, recorded as bad_response', async () => {
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(chunk(model, { role: 'assistant', content: '' }, null) + `data: ${BROKEN}\n\n` + chunk(model, {}, 'stop') + 'data: [DONE]\n\n');
        return true;
      };
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: unique('broken event') }] });
      expect(status).toBe(200);
      expect(text).not.toContain(BROKEN);
      // Every event the caller got is JSON (hasErrorEvent parses each).
      expect(hasErrorEvent(events), text).toBe(true);
      expect((JSON.parse(events.at(-2) ?? '{}') as ErrorBody).error.code).toBe('upstream_bad_response');
      expect(events.at(-1)).toBe('[DONE]');
      await pollUntil(async () => expect(await ledgerRows(gw, 'user', t.userId)).toHaveLength(1));
      expect((await ledgerRows(gw, 'user', t.userId))[0]?.outcome).toBe('bad_response');
    });

    it('a stream with an event that is not JSON is not stored under an idempotency-key: a repeat asks the upstream again', async () => {
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(chunk(model, { role: 'assistant', content: '' }, null) + `data: ${BROKEN}\n\n` + 'data: [DONE]\n\n');
        return true;
      };
      const t = await gw.tenants.create();
      const key = `idem-${randomBytes(4).toString('hex')}`;
      const send = () =>
        fetch(`${gw.url}/v1/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify({ model: MINI, stream: true, messages: [{ role: 'user', content: `broken idem ${key}` }] }),
        });
      await (await send()).text();
      const again = await send();
      expect(await again.text()).not.toContain(BROKEN);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      expect(gw.stub.hits).toBe(2);
    });

    it('a first event framed like JSON but not JSON is a failed attempt, retried, never relayed', async () => {
      gw.stub.script = (_req, _body, res) => {
        if (gw.stub.hits > 1) return false; // the stub answers the retry
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(`data: ${BROKEN}\n\ndata: [DONE]\n\n`);
        return true;
      };
      const t = await gw.tenants.create();
      const content = unique('broken first');
      const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content }] });
      expect(status).toBe(200);
      expect(text).not.toContain(BROKEN);
      expect(contentOf(events)).toBe(`Mock reply to: ${content}`);
      expect(gw.stub.hits).toBe(2);
    });

    it("a finished stream is charged the upstream's reported cost", async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const { status, events } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: unique('usage please') }] });
      expect(status).toBe(200);
      expect(events.at(-1)).toBe('[DONE]');
      await pollUntil(async () => expect(await ledgerRows(gw, 'user', t.userId)).toHaveLength(1));
      const [row] = await ledgerRows(gw, 'user', t.userId);
      expect(row).toMatchObject({ outcome: 'ok', cost_source: 'upstream' });
      expect(BigInt(row?.cost_nanos ?? 0)).toBeGreaterThan(0n);
    });

    it('a client leaving mid-stream stops the upstream read, and the call is settled (reservation released)', async () => {
      let upstreamClosed = false;
      gw.stub.script = (_req, body, res) => {
        const model = String(body.model);
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(chunk(model, { role: 'assistant', content: '' }, null) + chunk(model, { content: 'first ' }, null));
        const timer = setInterval(() => res.write(chunk(model, { content: 'more ' }, null)), 100);
        res.on('close', () => {
          clearInterval(timer);
          upstreamClosed = true;
        });
        return true;
      };
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const leaving = new AbortController();
      const response = await fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: MINI, stream: true, messages: [{ role: 'user', content: unique('leaving') }] }),
        signal: leaving.signal,
      });
      await response.body?.getReader().read();
      leaving.abort();
      await pollUntil(() => expect(upstreamClosed).toBe(true));
      await pollUntil(async () => expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n));
      expect((await ledgerRows(gw, 'user', t.userId)).at(-1)?.outcome).toBe('client_closed');
    });
  });

  describe('JSON answers', () => {
    it('a JSON body that stalls after its headers is a per-attempt timeout: retried, then answered', async () => {
      gw.stub.script = (_req, body, res) => {
        if (gw.stub.hits === 1) {
          // Headers and the start of the body, then nothing (a half-dead connection).
          res.writeHead(200, { 'content-type': 'application/json' });
          res.write('{"id":"chatcmpl-stall","object":"chat.completion",');
          return true;
        }
        const text = completionJson(String(body.model), 'scripted answer');
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
        res.end(text);
        return true;
      };
      const t = await gw.tenants.create();
      const res = await t.api.post<Completion>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: unique('stall') }] });
      expect(res.status, JSON.stringify(res.body)).toBe(200);
      expect(res.body.choices[0].message.content).toBe('scripted answer');
      expect(gw.stub.hits).toBe(2);
    });

    it('an answer that carries an error given as a string is a failed attempt, retried, never relayed', async () => {
      gw.stub.script = (_req, body, res) => {
        if (gw.stub.hits > 1) return false; // the stub answers the retry
        const text = completionJson(String(body.model), 'half an answer', { error: 'provider overloaded' });
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
        res.end(text);
        return true;
      };
      const t = await gw.tenants.create();
      const content = unique('json string error');
      const res = await t.api.post<Completion>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content }] });
      expect(res.status).toBe(200);
      expect(JSON.stringify(res.body)).not.toContain('provider overloaded');
      expect(res.body.choices[0].message.content).toBe(`Mock reply to: ${content}`);
      expect(gw.stub.hits).toBe(2);
    });

    it('a client leaving a JSON call stops the upstream request and releases the reservation', async () => {
      let upstreamClosed = false;
      gw.stub.script = (_req, _body, res) => {
        res.on('close', () => (upstreamClosed = true));
        return true; // never answers
      };
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const leaving = new AbortController();
      const pending = fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: MINI, messages: [{ role: 'user', content: unique('leaving json') }] }),
        signal: leaving.signal,
      });
      await pollUntil(() => expect(gw.stub.hits).toBe(1));
      leaving.abort();
      await pending.catch(() => undefined);
      await pollUntil(() => expect(upstreamClosed).toBe(true));
      await pollUntil(async () => expect((await storedBudget(gw, 'user', t.userId)).reserved).toBe(0n));
    });
  });

  it("sends the upstream only the gateway's own headers: nothing read from the operator's OPENAI_* environment", async () => {
    const t = await gw.tenants.create();
    const res = await t.api.post('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: unique('headers') }] });
    expect(res.status).toBe(200);
    const headers = gw.stub.requests.at(-1)?.headers ?? {};
    expect(headers['authorization']).toBe('Bearer sk-test-upstream-secret');
    expect(headers['openai-organization']).toBeUndefined();
    expect(headers['openai-project']).toBeUndefined();
    expect(headers['x-internal-token']).toBeUndefined();
    expect(headers['x-title']).toBe(gw.config.upstream.title);
  });
});
