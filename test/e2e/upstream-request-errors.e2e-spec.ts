import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StubUpstream } from '../../libs/stub-upstream/src/index.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

/**
 * The stub upstream answering every chat completion with OpenAI's own error shape (not
 * OpenRouter's numeric codes), as OpenAI refuses a prompt longer than the model's context: HTTP
 * 400 with `code: "context_length_exceeded"` and `param: "messages"`. Clients branch on that code
 * (trim the history and retry), so the SDK behind the gateway must see the same.
 */
function refuseEvery(stub: StubUpstream, error: Record<string, unknown>): void {
  stub.script = (_req, _body, res) => {
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error }));
    return true;
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
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_DRIVER: driver } });
    alice = await gw.tenants.create();
    refuseEvery(gw.stub, CONTEXT_TOO_LONG);
  });
  afterAll(async () => {
    await gw?.close();
  });

  it.each([false, true])('context_length_exceeded on messages (stream=%s)', async (stream) => {
    const before = gw.stub.hits;
    const err = await failure(alice.openai, stream, `a very long history ${String(stream)}`);
    expect(gw.stub.hits).toBe(before + 1); // the caller's to fix: not retried
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err).toMatchObject({ status: 400, type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' });
    expect((err as Error).message).toContain('maximum context length is 128000 tokens');
  });
});

describe("an upstream 400 whose code is not a word keeps the gateway's own", () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
    // OpenRouter's shape: the code is the HTTP status as a number; a param with a space is no field path.
    refuseEvery(gw.stub, { code: 400, message: 'Provider returned error', param: 'two words' });
  });
  afterAll(async () => {
    await gw?.close();
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
