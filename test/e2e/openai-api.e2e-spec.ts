import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

/** A chat completion sent with fetch, for the raw status, headers and bytes the SDK would hide. */
function postChat(url: string, key: string, body: Record<string, unknown>): Promise<Response> {
  return fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
}

describe('OpenAI API through the gateway (official SDK, stub upstream, PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { BODY_LIMIT_BYTES: '65536', UPSTREAM_TIMEOUT_MS: '1500' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('answers a chat completion routed by task_type, with gateway headers', async () => {
    const { data, response } = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content: 'write a haiku about queues' }], task_type: 'code' } as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
      .withResponse();
    expect(data.choices[0]?.message.content).toBe('Mock reply to: write a haiku about queues');
    expect(data.model).toBe('anthropic/claude-3.5-sonnet');
    expect(response.headers.get('x-gateway-model')).toBe('anthropic/claude-3.5-sonnet');
    expect(response.headers.get('x-gateway-route')).toContain('rule=code');
    expect(response.headers.get('x-request-id')).toBeTruthy();
    expect(response.headers.get('x-gateway-upstream')).toBeNull();
    // The upstream got the rule's default cap, our attribution headers and our key — not the caller's.
    const sent = gw.stub.requests.at(-1);
    expect(sent?.body).toMatchObject({ model: 'anthropic/claude-3.5-sonnet', max_tokens: 1024 });
    expect(sent?.body).not.toHaveProperty('task_type');
    expect(sent?.headers.authorization).toBe('Bearer sk-test-upstream-secret');
    expect(sent?.headers['http-referer']).toBeTruthy();
    expect(sent?.headers['x-title']).toBe('Gatehouse');
  });

  it('takes the task type from the x-task-type header, and falls back to the default rule for unknown ones', async () => {
    const viaHeader = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content: 'x' }] }, { headers: { 'x-task-type': 'budget' } })
      .withResponse();
    expect(viaHeader.data.model).toBe('meta-llama/llama-3.1-8b-instruct');
    const unknown = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content: 'x' }], task_type: 'poetry' } as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
      .withResponse();
    expect(unknown.data.model).toBe('openai/gpt-4o-mini');
    expect(unknown.response.headers.get('x-gateway-route')).toBe('task_type=poetry; rule=general; version=1');
    // task_type: null is absent, as on /v1/complete (clients that send unset fields as null): the header applies.
    const nulled = await alice.api.post<{ model: string }>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'x' }], task_type: null }, { 'x-task-type': 'budget' });
    expect(nulled.status).toBe(200);
    expect(nulled.body.model).toBe('meta-llama/llama-3.1-8b-instruct');
  });

  it('passes an explicit model through and treats "auto" as routing', async () => {
    const explicit = await alice.openai.chat.completions.create({ model: 'openai/gpt-4o', messages: [{ role: 'user', content: 'x' }] });
    expect(explicit.model).toBe('openai/gpt-4o');
    const auto = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'x' }] });
    expect(auto.model).toBe('openai/gpt-4o-mini');
  });

  it('streams SSE that the SDK reads, with a final usage chunk when asked', async () => {
    const stream = await alice.openai.chat.completions.create({
      model: 'auto',
      messages: [{ role: 'user', content: 'stream please' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe('Mock reply to: stream please');
    expect(usage?.completion_tokens).toBeGreaterThan(0);
  });

  it('relays an upstream event spread over several `data:` lines (pretty-printed JSON) so the SDK reads it, and so does its idempotent replay', async () => {
    // SSE lets one event's data run over several `data:` lines, joined with "\n" by the reader.
    // Relayed as one `data:` line with the newlines inside, the lines after the first reached
    // the client without a prefix, and the SDK threw "malformed server-sent event JSON".
    const pretty = (model: string, delta: Record<string, unknown>, finish: string | null) => {
      const json = JSON.stringify(
        { id: 'chatcmpl-s', object: 'chat.completion.chunk', created: 0, model, choices: [{ index: 0, delta, finish_reason: finish }] },
        null,
        2,
      );
      return `${json
        .split('\n')
        .map((line) => `data: ${line}`)
        .join('\n')}\n\n`;
    };
    gw.stub.script = (_req, body, res) => {
      const model = String(body.model);
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(
        pretty(model, { role: 'assistant', content: 'Hel' }, null) + pretty(model, { content: 'lo' }, null) + pretty(model, {}, 'stop') + 'data: [DONE]\n\n',
      );
      return true;
    };
    const content = `pretty-printed ${Date.now()}`;
    const key = `pretty-${Date.now()}`;
    const read = async () => {
      const { data, response } = await alice.openai.chat.completions
        .create({ model: 'auto', stream: true, messages: [{ role: 'user', content }] }, { headers: { 'idempotency-key': key } })
        .withResponse();
      let text = '';
      for await (const c of data) text += c.choices[0]?.delta.content ?? '';
      return { text, replayed: response.headers.get('idempotent-replayed') };
    };
    expect(await read()).toEqual({ text: 'Hello', replayed: null });
    expect(await read()).toEqual({ text: 'Hello', replayed: 'true' });
    expect(gw.stub.hits).toBe(1);
  });

  it('sends a JSON answer in one response of known length, with the request id, the rate-limit and the gateway headers', async () => {
    const content = `length ${Date.now()}`;
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json', 'x-request-id': 'json-answer-1' },
      body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content }] }),
    });
    const body = await res.text();
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(Number(res.headers.get('content-length'))).toBe(Buffer.byteLength(body));
    expect(res.headers.get('transfer-encoding')).toBeNull();
    // Set on the Fastify reply before the pipeline ran (request id hook, rate-limit guard): carried into the answer.
    expect(res.headers.get('x-request-id')).toBe('json-answer-1');
    expect(Number(res.headers.get('x-ratelimit-limit-requests'))).toBeGreaterThan(0);
    expect(res.headers.get('x-ratelimit-remaining-requests')).toMatch(/^\d+$/);
    expect(res.headers.get('x-gateway-cache')).toBe('miss');
    expect(res.headers.get('x-gateway-cost-usd')).toMatch(/^\d+(\.\d+)?$/);
    expect((JSON.parse(body) as OpenAI.Chat.ChatCompletion).choices[0]?.message.content).toBe(`Mock reply to: ${content}`);
  });

  it('does not send the usage chunk to a client that did not ask for it', async () => {
    const stream = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'quiet' }], stream: true });
    const chunks: OpenAI.Chat.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks.length).toBeGreaterThan(2);
    expect(chunks.every((c) => !c.usage)).toBe(true);
  });

  it('relays a live stream as its events arrive (chunked), and sends a stream that is complete at once as one response of known length', async () => {
    // Live: the stub pauses between events, so the first body bytes must reach the client while
    // the upstream is still producing; the length is unknown, so the response is chunked.
    gw.stub.configure({ chunkDelayMs: 100 });
    const content = `relay ${Date.now()}`;
    const live = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content }] }),
    });
    expect(live.status).toBe(200);
    expect(live.headers.get('transfer-encoding')).toBe('chunked');
    expect(live.headers.get('content-length')).toBeNull();
    const reader = (live.body as ReadableStream<Uint8Array>).getReader();
    const decoder = new TextDecoder();
    const first = await reader.read();
    const firstText = decoder.decode(first.value);
    expect(firstText).toContain('data: {');
    expect(firstText).not.toContain('[DONE]');
    let rest = '';
    for (let next = await reader.read(); !next.done; next = await reader.read()) rest += decoder.decode(next.value, { stream: true });
    expect(`${firstText}${rest}`.endsWith('data: [DONE]\n\n')).toBe(true);

    // The same request again is a cache hit: the whole stream exists at once, and goes out with
    // its length, in one piece, as a JSON answer does. The SDK reads it as any stream.
    gw.stub.reset();
    const replay = await alice.api.post<string>('/v1/chat/completions', { model: 'auto', stream: true, messages: [{ role: 'user', content }] });
    expect(replay.headers.get('x-gateway-cache')).toBe('hit');
    expect(replay.headers.get('transfer-encoding')).toBeNull();
    expect(Number(replay.headers.get('content-length'))).toBe(Buffer.byteLength(replay.body));
    expect(replay.body.endsWith('data: [DONE]\n\n')).toBe(true);
    const viaSdk = await alice.openai.chat.completions.create({ model: 'auto', stream: true, messages: [{ role: 'user', content }] });
    let text = '';
    for await (const chunk of viaSdk) text += chunk.choices[0]?.delta.content ?? '';
    expect(text).toBe(`Mock reply to: ${content}`);
    expect(gw.stub.hits).toBe(0);
  });

  it('serves the simple /v1/complete form', async () => {
    const res = await alice.api.post<Record<string, unknown>>('/v1/complete', { prompt: 'classify this', task_type: 'classification', max_tokens: 50 });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ content: 'Mock reply to: classify this', model: 'openai/gpt-4o-mini', cached: false });
    expect(typeof res.body.tokens).toBe('number');
    expect(typeof res.body.cost_usd).toBe('number');
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ max_tokens: 50 });
  });

  it('/v1/complete takes only its own fields, each of its type, naming the first wrong one, before the upstream', async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ prompt: 'x', temperature: '0.9' }, 'temperature'],
      [{ prompt: 'x', temperature: 2.5 }, 'temperature'],
      [{ prompt: 'x', max_tokens: '50' }, 'max_tokens'],
      [{ prompt: 'x', task_type: 7 }, 'task_type'],
      [{ prompt: 'x', stream: true }, 'stream'],
      [{ prompt: 'x', top_p: 0.1 }, 'top_p'],
      [{ prompt: 'x', system: 'be terse' }, 'system'],
      [{ prompt: 'x', frequency_penalty: 'x' }, 'frequency_penalty'],
      [{ messages: [{ role: 'user', content: 'x' }] }, 'messages'],
      [{ prompt: 'x', callback_url: 'https://hooks.example.com/done' }, 'callback_url'],
    ];
    for (const [body, param] of cases) {
      const res = await alice.api.post('/v1/complete', body);
      expect(res, JSON.stringify(body)).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value', param } } });
    }
    expect(gw.stub.hits).toBe(0);
    // Every field it documents, and the task type from the header as on the chat door.
    const full = await alice.api.post<Record<string, unknown>>(
      '/v1/complete',
      { prompt: 'all of it', model: 'auto', max_tokens: 20, temperature: 0 },
      { 'x-task-type': 'budget' },
    );
    expect(full).toMatchObject({ status: 200, body: { model: 'meta-llama/llama-3.1-8b-instruct' } });
    expect(full.headers.get('x-gateway-route')).toContain('task_type=budget');
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ max_tokens: 20, temperature: 0 });
  });

  it('lists models and task types', async () => {
    const models = await alice.openai.models.list();
    const ids = models.data.map((m) => m.id);
    expect(ids).toEqual(expect.arrayContaining(['auto', 'openai/gpt-4o-mini', 'anthropic/claude-3.5-sonnet', 'meta-llama/llama-3.1-8b-instruct']));
  });

  it('echoes a well-formed x-request-id and replaces a malformed one', async () => {
    const good = await alice.api.get('/v1/models', { 'x-request-id': 'trace-abc.123' });
    expect(good.headers.get('x-request-id')).toBe('trace-abc.123');
    const bad = await alice.api.get('/v1/models', { 'x-request-id': 'no spaces allowed <script>' });
    expect(bad.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
  });

  describe('errors in the OpenAI envelope, typed by the SDK', () => {
    it('401 for a missing, unknown or revoked key', async () => {
      await expect(gw.openai('gh-not-a-key').models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
      const none = await gw.admin.request('GET', '/v1/models', undefined, { authorization: '' });
      expect(none.status).toBe(401);
      const bob = await gw.tenants.create();
      await gw.admin.delete(`/admin/keys/${bob.keyId}`);
      const err = await bob.openai.models.list().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
      expect((err as InstanceType<typeof OpenAI.APIError>).code).toBe('invalid_api_key');
    });

    it('400 naming the field for missing messages and wrong types', async () => {
      const missing = await alice.api.post('/v1/chat/completions', { model: 'auto' });
      expect(missing).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'missing_field', param: 'messages' } } });
      const err = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'x' }], max_tokens: -3 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      expect((err as InstanceType<typeof OpenAI.APIError>).param).toBe('max_tokens');
      const wrongType = await alice.api.post('/v1/chat/completions', { messages: 'hello' });
      expect(wrongType.body).toMatchObject({ error: { param: 'messages' } });
      // OpenAI refuses these too; relayed, the answer depended on the upstream.
      const noRole = await alice.api.post('/v1/chat/completions', { messages: [{ content: 'x' }] });
      expect(noRole).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'missing_field', param: 'messages[0].role' } } });
      const noCallId = await alice.api.post('/v1/chat/completions', { messages: [{ role: 'tool', content: 'done' }] });
      expect(noCallId).toMatchObject({ status: 400, body: { error: { code: 'missing_field', param: 'messages[0].tool_call_id' } } });
      // The async door validates as the sync one: no job is made for a request that cannot run.
      const asyncRole = await alice.api.post('/v1/chat/completions', { messages: [{ role: 'wizard', content: 'x' }] }, { prefer: 'respond-async' });
      expect(asyncRole).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'messages[0].role' } } });
    });

    it('400 naming the field for unknown roles, wrong types of content, tool_call_id, tools, response_format, user and stream_options, sampling values out of range and a callback_url without respond-async, before the upstream or the budget', async () => {
      // Requests in the caller's own ledger: a refused call must not appear there.
      const ledgered = async () => (await alice.api.get<{ spend: Array<{ requests: number }> }>('/v1/usage')).body.spend.reduce((n, s) => n + s.requests, 0);
      const before = await ledgered();
      const message = { role: 'user', content: 'typed' };
      for (const [body, param] of [
        [{ messages: [{ role: 'user', content: 5 }] }, 'messages[0].content'],
        [{ messages: [message, { role: 'user', content: { text: 'x' } }] }, 'messages[1].content'],
        [{ messages: [{ role: 'wizard', content: 'x' }] }, 'messages[0].role'],
        [{ messages: [message, { role: 5, content: 'x' }] }, 'messages[1].role'],
        [{ messages: [message, { role: 'tool', tool_call_id: 7, content: 'done' }] }, 'messages[1].tool_call_id'],
        [{ messages: [message], tools: 'search' }, 'tools'],
        [{ messages: [message], tools: [5] }, 'tools[0]'],
        [{ messages: [message], response_format: 'json' }, 'response_format'],
        [{ messages: [message], user: 42 }, 'user'],
        [{ messages: [message], stream_options: 'usage' }, 'stream_options'],
        [{ messages: [message], stream: true, stream_options: { include_usage: 'yes' } }, 'stream_options.include_usage'],
        [{ messages: [message], temperature: 2.5 }, 'temperature'],
        [{ messages: [message], top_p: -1 }, 'top_p'],
        // Without prefer: respond-async nothing would ever call it back.
        [{ messages: [message], callback_url: 'https://hooks.example.com/done' }, 'callback_url'],
      ] as const) {
        const res = await alice.api.post('/v1/chat/completions', body, { 'cache-control': 'no-cache' });
        expect(res, JSON.stringify(body)).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value', param } } });
      }
      // The forms OpenAI accepts still pass: text, parts, and null content next to tool calls.
      const parts = await alice.api.post('/v1/chat/completions', {
        messages: [
          { role: 'user', content: [{ type: 'text', text: 'parts' }] },
          { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{}' } }] },
          { role: 'tool', tool_call_id: 'c1', content: 'done' },
        ],
        response_format: { type: 'text' },
        user: 'end-user-7',
      });
      expect(parts.status).toBe(200);
      expect(gw.stub.hits).toBe(1);
      // Settles are written in batches: wait for the one answered call, and only it, to land.
      await pollUntil(async () => expect(await ledgered()).toBe(before + 1));
    });

    it('400, not 500, for a body nested deeper than any real request, on every door, before the upstream', async () => {
      const deep = (depth: number) => '['.repeat(depth) + ']'.repeat(depth);
      const raw = (path: string, body: string, headers: Record<string, string> = {}) =>
        alice.api.request<{ error: { code: string; type: string } }>('POST', path, body, { 'content-type': 'application/json', 'cache-control': 'no-cache', ...headers });
      for (const [path, body] of [
        ['/v1/chat/completions', `{"messages":[{"role":"user","content":${deep(5000)}}]}`],
        ['/v1/chat/completions', `{"messages":[{"role":"user","content":"x"}],"tools":${'{"a":'.repeat(3000)}1${'}'.repeat(3000)}}`],
        ['/v1/chat/completions', `{"messages":[{"role":"user","content":"x"}],"metadata":${deep(5000)}}`],
        ['/v1/chat/completions', `{"messages":[{"role":"user","content":"x"}],"stream":true,"metadata":${deep(5000)}}`],
        ['/v1/complete', `{"prompt":"x","metadata":${deep(5000)}}`],
      ] as const) {
        const res = await raw(path, body);
        expect(res, body.slice(0, 60)).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value' } } });
      }
      const submitted = await raw('/v1/complete', `{"prompt":"x","metadata":${deep(5000)}}`, { prefer: 'respond-async', 'idempotency-key': 'deep-1' });
      expect(submitted.status).toBe(400);
      expect(gw.stub.hits).toBe(0);
      // A realistic depth (a nested JSON schema in a tool) is fine.
      const schema = JSON.parse(`${'{"type":"object","properties":{"a":'.repeat(12)}{"type":"string"}${'}}'.repeat(12)}`) as unknown;
      const ok = await alice.api.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'schema' }], tools: [{ type: 'function', function: { name: 'f', parameters: schema } }] });
      expect(ok.status).toBe(200);
    });

    it('400 invalid_json for a malformed or empty JSON body, 413 for a body over the limit', async () => {
      const malformed = await alice.api.request('POST', '/v1/chat/completions', '{"messages": [', { 'content-type': 'application/json' });
      expect(malformed).toMatchObject({ status: 400, body: { error: { code: 'invalid_json' } } });
      // Fastify refuses an empty one with an error of its own, which was answered invalid_value in Fastify's wording.
      const empty = await alice.api.request('POST', '/v1/chat/completions', '', { 'content-type': 'application/json' });
      expect(empty).toMatchObject({
        status: 400,
        body: { error: { type: 'invalid_request_error', code: 'invalid_json', message: 'Request body is not valid JSON.' } },
      });
      const huge = await alice.api.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x'.repeat(100_000) }] });
      expect(huge).toMatchObject({ status: 413, body: { error: { code: 'payload_too_large', type: 'invalid_request_error' } } });
      expect(gw.stub.hits).toBe(0);
    });

    it('403 for a user key on /admin, 404 in the same envelope for unknown routes', async () => {
      const forbidden = await alice.api.get('/admin/keys');
      expect(forbidden).toMatchObject({ status: 403, body: { error: { type: 'permission_error', code: 'forbidden' } } });
      const unknown = await alice.api.get('/v1/nothing-here');
      expect(unknown).toMatchObject({ status: 404, body: { error: { type: 'not_found_error', code: 'not_found' } } });
    });

    it('upstream failures map to 502/504 and never leak the upstream key', async () => {
      // no-cache: 'x' was answered (and cached) by an earlier test; this one needs the upstream.
      const fresh = { 'cache-control': 'no-cache' };
      gw.stub.configure({ status: 500 });
      const failed = await alice.api.post<{ error: { message: string } }>('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }] }, fresh);
      expect(failed).toMatchObject({ status: 502, body: { error: { type: 'upstream_error', code: 'upstream_error' } } });
      gw.stub.configure({ hangMs: 5000 });
      const slow = await alice.api.post<{ error: { message: string } }>('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }] }, fresh);
      expect(slow).toMatchObject({ status: 504, body: { error: { code: 'upstream_timeout' } } });
      for (const res of [failed, slow]) expect(JSON.stringify(res.body)).not.toContain('sk-test-upstream-secret');
    });

    it('an upstream 200 that is not JSON, as a body or as a stream event, is 502 upstream_bad_response and never relayed or cached', async () => {
      gw.stub.configure({ malformedJson: true });
      const body = { messages: [{ role: 'user', content: 'garbled' }] };
      const json = await alice.api.post('/v1/chat/completions', body);
      expect(json).toMatchObject({ status: 502, body: { error: { type: 'upstream_error', code: 'upstream_bad_response' } } });
      const stream = await postChat(gw.url, alice.key, { ...body, stream: true });
      const text = await stream.text();
      expect(stream.status).toBe(502);
      expect(JSON.parse(text)).toMatchObject({ error: { code: 'upstream_bad_response' } });
      expect(text).not.toContain('"content":"Mo');
      // Nothing was cached from it: the same request answers normally once the upstream is sane.
      gw.stub.reset();
      const healthy = await alice.api.post('/v1/chat/completions', body);
      expect(healthy.status).toBe(200);
      expect(healthy.headers.get('x-gateway-cache')).toBe('miss');
    });

    it('an upstream 200 with no answer in it (a choice without message, [DONE] before any event) is 502 upstream_bad_response, and leaves the cache working', async () => {
      gw.stub.configure({ emptyAnswer: true });
      const body = { messages: [{ role: 'user', content: 'nothing in it' }] };
      const json = await alice.api.post('/v1/chat/completions', body);
      expect(json).toMatchObject({ status: 502, body: { error: { type: 'upstream_error', code: 'upstream_bad_response' } } });
      const stream = await postChat(gw.url, alice.key, { ...body, stream: true });
      expect(stream.status).toBe(502);
      expect(JSON.parse(await stream.text())).toMatchObject({ error: { code: 'upstream_bad_response' } });
      // Nothing was cached and nothing was left holding the key: once the upstream is sane the
      // request is a miss that fills the cache, and the next one a hit, for JSON and for streams.
      gw.stub.reset();
      const healthy = await alice.api.post('/v1/chat/completions', body);
      expect(healthy.status).toBe(200);
      expect(healthy.headers.get('x-gateway-cache')).toBe('miss');
      const again = await alice.api.post('/v1/chat/completions', body);
      expect(again.headers.get('x-gateway-cache')).toBe('hit');
      const replay = await postChat(gw.url, alice.key, { ...body, stream: true });
      expect(replay.status).toBe(200);
      expect(replay.headers.get('x-gateway-cache')).toBe('hit');
      expect(await replay.text()).toContain('data: [DONE]');
    });

    it("upstream 401/402/429 become 502 with precise codes, never the caller's own status", async () => {
      for (const [status, code] of [
        [401, 'upstream_auth'],
        [402, 'upstream_insufficient_credits'],
        [429, 'upstream_rate_limited'],
      ] as const) {
        gw.stub.configure({ status });
        const res = await alice.api.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }] }, { 'cache-control': 'no-cache' });
        expect(res).toMatchObject({ status: 502, body: { error: { type: 'upstream_error', code } } });
      }
    });
  });

  it('reports liveness and readiness in the terminus format', async () => {
    const live = await gw.admin.get('/health/live');
    expect(live).toMatchObject({ status: 200, body: { status: 'ok' } });
    const ready = await gw.admin.get('/health/ready');
    expect(ready).toMatchObject({ status: 200, body: { status: 'ok', details: { database: { status: 'up', driver: 'pglite' } } } });
  });

  it('serves OpenAPI docs generated from the DTOs', async () => {
    const doc = await gw.admin.get<{ paths: Record<string, unknown> }>('/docs/openapi.json');
    expect(doc.status).toBe(200);
    expect(Object.keys(doc.body.paths)).toEqual(expect.arrayContaining(['/v1/chat/completions', '/v1/complete', '/admin/keys']));
  });
});
