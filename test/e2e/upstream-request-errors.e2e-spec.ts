import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

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
