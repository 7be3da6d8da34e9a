import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

/**
 * An OpenAI-compatible upstream (OpenAI's own error shape, not OpenRouter's numeric codes) that
 * refuses every chat completion as OpenAI refuses a prompt longer than the model's context:
 * HTTP 400 with `code: "context_length_exceeded"` and `param: "messages"`. Clients branch on that
 * code (trim the history and retry), so the SDK behind the gateway must see the same.
 */
async function startRefusingUpstream(error: Record<string, unknown>): Promise<{ url: string; hits: () => number; close: () => Promise<void> }> {
  let hits = 0;
  const server: Server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      if (req.method === 'GET') {
        res.end(JSON.stringify({ object: 'list', data: [] }));
        return;
      }
      hits += 1;
      res.statusCode = 400;
      res.end(JSON.stringify({ error }));
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

const CONTEXT_TOO_LONG = {
  message: "This model's maximum context length is 128000 tokens. However, your messages resulted in 130512 tokens. Please reduce the length of the messages.",
  type: 'invalid_request_error',
  param: 'messages',
  code: 'context_length_exceeded',
};

async function failure(client: OpenAI, stream: boolean, content: string): Promise<unknown> {
  try {
    const res = await client.chat.completions.create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content }], stream });
    if (stream) for await (const _ of res as AsyncIterable<unknown>) void _;
    return undefined;
  } catch (error) {
    return error;
  }
}

describe.each(['undici', 'sdk'])("an upstream's 400 about the request reaches the SDK with its code and param (%s driver)", (driver) => {
  let upstream: Awaited<ReturnType<typeof startRefusingUpstream>>;
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    upstream = await startRefusingUpstream(CONTEXT_TOO_LONG);
    gw = await startTestGateway({ env: { OPENROUTER_BASE_URL: upstream.url, UPSTREAM_DRIVER: driver } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await upstream?.close();
  });

  it.each([false, true])('context_length_exceeded on messages (stream=%s)', async (stream) => {
    const before = upstream.hits();
    const err = await failure(alice.openai, stream, `a very long history ${String(stream)}`);
    expect(upstream.hits()).toBe(before + 1); // the caller's to fix: not retried
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err).toMatchObject({ status: 400, type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' });
    expect((err as Error).message).toContain('maximum context length is 128000 tokens');
  });
});

describe("an upstream 400 whose code is not a word keeps the gateway's own", () => {
  let upstream: Awaited<ReturnType<typeof startRefusingUpstream>>;
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    // OpenRouter's shape: the code is the HTTP status as a number; a param with a space is no field path.
    upstream = await startRefusingUpstream({ code: 400, message: 'Provider returned error', param: 'two words' });
    gw = await startTestGateway({ env: { OPENROUTER_BASE_URL: upstream.url } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await upstream?.close();
  });

  it('is invalid_value without a param', async () => {
    const err = await failure(alice.openai, false, 'hello');
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err).toMatchObject({ status: 400, code: 'invalid_value', param: null });
  });
});

describe('n, the number of choices', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it.each([17, 128])('accepts n=%i, as OpenAI does, and passes it upstream', async (n) => {
    const res = await alice.openai.chat.completions.create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content: `n is ${n}` }], n, max_tokens: 4 });
    expect(res.choices.length).toBeGreaterThan(0);
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ n });
  });

  it('refuses n=129 with a 400 naming n, before the upstream', async () => {
    const before = gw.stub.requests.length;
    const err = await alice.openai.chat.completions
      .create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content: 'too many' }], n: 129 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err).toMatchObject({ status: 400, code: 'invalid_value', param: 'n' });
    expect(gw.stub.requests.length).toBe(before);
  });
});
