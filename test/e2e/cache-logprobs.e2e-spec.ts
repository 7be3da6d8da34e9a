import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

type TokenLogprob = OpenAI.Chat.ChatCompletionTokenLogprob;

const TOKENS = ['Blue', ' sky', '.'];
const tokenLogprob = (token: string, i: number): TokenLogprob => ({
  token,
  logprob: -0.25 * (i + 1),
  bytes: [...Buffer.from(token)],
  top_logprobs: [{ token, logprob: -0.25 * (i + 1), bytes: [...Buffer.from(token)] }],
});

/**
 * An upstream that answers with logprobs when asked, as OpenAI does: a JSON answer carries every
 * token's, a stream carries on each chunk the logprobs of that chunk's token. The stub upstream
 * has no logprobs, hence this one. Every answer has a new id, so a hit is told from a miss.
 */
async function startLogprobsUpstream(): Promise<{ url: string; hits: () => number; close: () => Promise<void> }> {
  let hits = 0;
  const server: Server = createServer((req, res) => {
    let text = '';
    req.on('data', (c: Buffer) => (text += c.toString()));
    req.on('end', () => {
      if (req.method === 'GET') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ object: 'list', data: [] }));
        return;
      }
      hits += 1;
      const body = JSON.parse(text) as { model: string; stream?: boolean; logprobs?: boolean; stream_options?: { include_usage?: boolean } };
      const id = `chatcmpl-lp-${hits}`;
      const head = { id, created: 1_700_000_000, model: body.model, system_fingerprint: 'fp_lp' };
      const usage = { prompt_tokens: 5, completion_tokens: TOKENS.length, total_tokens: 5 + TOKENS.length };
      const logprobs = body.logprobs === true;
      if (body.stream !== true) {
        res.setHeader('content-type', 'application/json');
        const message = { role: 'assistant', content: TOKENS.join('') };
        const choice = { index: 0, message, finish_reason: 'stop', logprobs: logprobs ? { content: TOKENS.map(tokenLogprob), refusal: null } : null };
        res.end(JSON.stringify({ ...head, object: 'chat.completion', choices: [choice], usage }));
        return;
      }
      res.setHeader('content-type', 'text/event-stream');
      const send = (o: Record<string, unknown>) => res.write(`data: ${JSON.stringify({ ...head, object: 'chat.completion.chunk', ...o })}\n\n`);
      send({ choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }] });
      TOKENS.forEach((token, i) =>
        send({
          choices: [
            { index: 0, delta: { content: token }, logprobs: logprobs ? { content: [tokenLogprob(token, i)], refusal: null } : null, finish_reason: null },
          ],
        }),
      );
      send({ choices: [{ index: 0, delta: {}, logprobs: null, finish_reason: 'stop' }] });
      if (body.stream_options?.include_usage) send({ choices: [], usage });
      res.end('data: [DONE]\n\n');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`,
    hits: () => hits,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** A stream read through the SDK: its text, every chunk's content logprobs joined, and the cache header. */
async function streamed(tenant: Tenant, content: string): Promise<{ cache: string | null; text: string; logprobs: TokenLogprob[] }> {
  const { data, response } = await tenant.openai.chat.completions
    .create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content }], logprobs: true, top_logprobs: 1, stream: true })
    .withResponse();
  let text = '';
  const logprobs: TokenLogprob[] = [];
  for await (const chunk of data) {
    text += chunk.choices[0]?.delta.content ?? '';
    logprobs.push(...(chunk.choices[0]?.logprobs?.content ?? []));
  }
  return { cache: response.headers.get('x-gateway-cache'), text, logprobs };
}

describe('cached answers keep their logprobs, whichever door filled them', () => {
  let upstream: Awaited<ReturnType<typeof startLogprobsUpstream>>;
  let gw: TestGateway;
  let alice: Tenant;
  const prompt = (tag: string) => `${tag} ${randomBytes(4).toString('hex')}`;
  const json = (content: string) =>
    alice.openai.chat.completions
      .create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content }], logprobs: true, top_logprobs: 1 })
      .withResponse();

  beforeAll(async () => {
    upstream = await startLogprobsUpstream();
    gw = await startTestGateway({ env: { OPENROUTER_BASE_URL: upstream.url } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw.close();
    await upstream.close();
  });

  it('a stream served from an entry a JSON answer filled carries the same logprobs', async () => {
    const content = prompt('json-first');
    const miss = await json(content);
    expect(miss.response.headers.get('x-gateway-cache')).toBe('miss');
    const expected = miss.data.choices[0]?.logprobs?.content;
    expect(expected).toEqual(TOKENS.map(tokenLogprob));
    const hits = upstream.hits();

    const hit = await streamed(alice, content);
    expect(hit.cache).toBe('hit');
    expect(upstream.hits()).toBe(hits);
    expect(hit.text).toBe(TOKENS.join(''));
    expect(hit.logprobs).toEqual(expected);
  });

  it('a stream with logprobs is cached whole: JSON and stream hits carry what the live stream carried', async () => {
    const content = prompt('stream-first');
    const live = await streamed(alice, content);
    expect(live.cache).toBe('miss');
    expect(live.logprobs).toEqual(TOKENS.map(tokenLogprob));
    const hits = upstream.hits();

    const fromJson = await json(content);
    expect(fromJson.response.headers.get('x-gateway-cache')).toBe('hit');
    expect(fromJson.data.choices[0]?.message.content).toBe(live.text);
    expect(fromJson.data.choices[0]?.logprobs?.content).toEqual(live.logprobs);

    const again = await streamed(alice, content);
    expect(again.cache).toBe('hit');
    expect(again.logprobs).toEqual(live.logprobs);
    expect(upstream.hits()).toBe(hits);
  });
});
