import { performance } from 'node:perf_hooks';
import { request } from 'undici';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../libs/stub-upstream/src/index.js';
import { type ParseFloorProxy, SseUsageReader, startParseFloorProxy } from './parse-floor-proxy.js';

const MODEL = 'openai/gpt-4o-mini';
const MESSAGES = [{ role: 'user', content: 'héllo — parse floor' }];

let stub: StubUpstream;
let proxy: ParseFloorProxy;

beforeAll(async () => {
  stub = await startStubUpstream();
  proxy = await startParseFloorProxy(new URL(stub.url).origin);
});
afterAll(async () => {
  await proxy.close();
  await stub.close();
});
afterEach(() => stub.reset());

async function post(origin: string, body: string) {
  return request(`${origin}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
}

describe('parse floor proxy against the real stub', () => {
  it('forwards a JSON answer intact and reads its usage', async () => {
    // Spacing the proxy must drop when it re-serialises: the stub sees the parsed request, not these bytes.
    const sent = { model: MODEL, messages: MESSAGES, max_tokens: 5 };
    const tokensBefore = proxy.totalTokens;
    const res = await post(proxy.url, JSON.stringify(sent, null, 2));
    const bytes = Buffer.from(await res.body.arrayBuffer());

    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toBe('application/json');
    expect(Number(res.headers['content-length'])).toBe(bytes.length);
    const answer = JSON.parse(bytes.toString('utf8')) as { object: string; choices: unknown[]; usage: { total_tokens: number } };
    expect(answer.object).toBe('chat.completion');
    expect(answer.choices).toHaveLength(1);
    expect(proxy.totalTokens - tokensBefore).toBe(answer.usage.total_tokens);

    expect(stub.hits).toBe(1);
    expect(stub.requests[0]?.body).toEqual(sent);
    expect(stub.requests[0]?.headers['content-length']).toBe(String(Buffer.byteLength(JSON.stringify(sent))));
  });

  it('relays an SSE stream chunk by chunk as the stub sends it, ending with [DONE], and reads the usage event', async () => {
    stub.configure({ chunkDelayMs: 30, completionTokens: 4 });
    const tokensBefore = proxy.totalTokens;
    const res = await post(proxy.url, JSON.stringify({ model: MODEL, messages: MESSAGES, stream: true, stream_options: { include_usage: true } }));
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toBe('text/event-stream');
    const arrivals: number[] = [];
    let text = '';
    for await (const chunk of res.body) {
      arrivals.push(performance.now());
      text += (chunk as Buffer).toString('utf8');
    }

    // role, 4 words, finish, usage, [DONE] — 30 ms apart upstream; a buffering relay delivers one lump.
    expect(arrivals.length).toBeGreaterThanOrEqual(5);
    expect((arrivals.at(-1) as number) - arrivals[0]).toBeGreaterThan(100);
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
    const usage = text
      .split('\n\n')
      .filter((e) => e.startsWith('data: {'))
      .map((e) => JSON.parse(e.slice(6)) as { usage?: { total_tokens: number } })
      .find((e) => e.usage)?.usage;
    expect(usage?.total_tokens).toBeGreaterThan(0);
    expect(proxy.totalTokens - tokensBefore).toBe(usage?.total_tokens);
    expect(stub.hits).toBe(1);
  });

  it('forwards the upstream’s error status and body', async () => {
    stub.configure({ status: 503 });
    const res = await post(proxy.url, JSON.stringify({ model: MODEL, messages: MESSAGES }));
    expect(res.statusCode).toBe(503);
    expect(((await res.body.json()) as { error: { message: string } }).error.message).toMatch(/503/);
    expect(stub.hits).toBe(1);
  });

  it('refuses a body that is not JSON without calling the upstream', async () => {
    const res = await post(proxy.url, '{"model":');
    expect(res.statusCode).toBe(400);
    expect(((await res.body.json()) as { error: { type: string } }).error.type).toBe('invalid_request_error');
    expect(stub.hits).toBe(0);
  });
});

describe('SseUsageReader', () => {
  const stream = Buffer.from(
    ': comment\n\n' +
      'data: {"choices":[{"delta":{"content":"é—ü"}}]}\n\n' +
      'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n' +
      'data: [DONE]\n\n',
  );

  it('finds the usage event wherever the chunks split the stream, multi-byte characters included', () => {
    for (let cut = 1; cut < stream.length; cut++) {
      const reader = new SseUsageReader();
      const total = reader.push(stream.subarray(0, cut)) + reader.push(stream.subarray(cut));
      expect(total, `split at byte ${cut}`).toBe(7);
    }
  });

  it('counts an event only once it is complete', () => {
    const reader = new SseUsageReader();
    const end = stream.indexOf('[DONE]');
    expect(reader.push(stream.subarray(0, end - 8))).toBe(0);
    expect(reader.push(stream.subarray(end - 8))).toBe(7);
  });
});
