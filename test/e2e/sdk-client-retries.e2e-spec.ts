import { randomBytes } from 'node:crypto';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';

type APIError = InstanceType<typeof OpenAI.APIError>;
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// The official SDK, used unchanged, retries 408/409/429/5xx twice by default unless the server
// answers `x-should-retry: false`. Where the gateway has already retried as far as it would (its key
// or credit refused: every model would fail the same way; a 504: the deadline spent), the SDK must
// not run the whole call again twice, tripling the upstream's load and the caller's wait. Other 502s
// stay retryable for the SDK.

const MINI = 'openai/gpt-4o-mini';
const unique = (t: string) => `${t} ${randomBytes(4).toString('hex')}`;

describe('the official SDK with its default retries against errors the gateway already retried', () => {
  let gw: TestGateway;
  let alice: Tenant;
  /** As an application builds it: default maxRetries (2). */
  let sdk: OpenAI;

  beforeAll(async () => {
    gw = await startTestGateway({
      env: { UPSTREAM_TIMEOUT_MS: '300', UPSTREAM_DEADLINE_MS: '700', UPSTREAM_RETRY_BASE_MS: '1', UPSTREAM_RETRY_MAX_DELAY_MS: '5' },
    });
    alice = await gw.tenants.create();
    sdk = new OpenAI({ apiKey: alice.key, baseURL: `${gw.url}/v1` });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => gw.stub.reset());

  it.each([
    [401, 'upstream_auth'],
    [402, 'upstream_insufficient_credits'],
  ] as const)(
    'an upstream %i (the gateway\'s own key or credit: "every model would fail the same way") reaches the upstream once, not once per SDK retry',
    async (status, code) => {
      gw.stub.configure({ status });
      const before = gw.stub.hits;
      const error = await sdk.chat.completions.create({ model: MINI, messages: [{ role: 'user', content: unique('hello') }] }).then(
        () => undefined,
        (e: unknown) => e as APIError,
      );
      expect(error).toBeInstanceOf(OpenAI.APIError);
      expect(error?.status).toBe(502);
      expect(error?.code).toBe(code);
      // The gateway itself stops after one attempt for these (failureAction 'stop'); it should
      // say so to the SDK (x-should-retry: false) instead of inviting two more identical calls.
      expect(gw.stub.hits - before).toBe(1);
      expect(error?.headers?.get('x-should-retry')).toBe('false');
    },
  );

  it('a 504 upstream_timeout (the whole UPSTREAM_DEADLINE_MS spent) is not run again twice by the SDK', async () => {
    gw.stub.configure({ hangMs: 10_000 });
    // What one gateway call costs the upstream, seen by a client that does not retry.
    let before = gw.stub.hits;
    const once = await alice.openai.chat.completions.create({ model: MINI, messages: [{ role: 'user', content: unique('slow') }] }).catch((e: unknown) => e as APIError);
    expect((once as APIError).status).toBe(504);
    const perCall = gw.stub.hits - before;

    before = gw.stub.hits;
    const error = await sdk.chat.completions.create({ model: MINI, messages: [{ role: 'user', content: unique('slow') }] }).then(
      () => undefined,
      (e: unknown) => e as APIError,
    );
    expect(error?.status).toBe(504);
    expect(error?.code).toBe('upstream_timeout');
    // One deadline's worth of upstream attempts, not three.
    expect(gw.stub.hits - before).toBe(perCall);
    expect(error?.headers?.get('x-should-retry')).toBe('false');
  });

  it('a 502 the upstream may get over (its 5xx, after the gateway\'s retries) is left to the SDK to retry', async () => {
    gw.stub.configure({ status: 503 });
    const error = await alice.openai.chat.completions.create({ model: MINI, messages: [{ role: 'user', content: unique('flaky') }] }).then(
      () => undefined,
      (e: unknown) => e as APIError,
    );
    expect(error?.status).toBe(502);
    expect(error?.code).toBe('upstream_error');
    expect(error?.headers?.get('x-should-retry')).toBeNull();
  });
});
