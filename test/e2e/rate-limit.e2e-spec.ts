import { randomBytes } from 'node:crypto';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { ApiClient, type HttpResult, pollUntil, postSse, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

const prompt = () => `rate ${randomBytes(4).toString('hex')}`;
// Distinct prompts, so every served request really reaches the upstream (no cache hits).
const ask = (client: ApiClient) => client.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: prompt() }] });
const trio = (res: HttpResult) => ({
  limit: res.headers.get('x-ratelimit-limit-requests'),
  remaining: res.headers.get('x-ratelimit-remaining-requests'),
  reset: res.headers.get('x-ratelimit-reset-requests'),
});

describe('rate limits (memory driver, one instance)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { RATE_LIMIT_KEY_RPM: '50', RATE_LIMIT_USER_RPM: '80', RATE_LIMIT_DEPARTMENT_RPM: '200' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('puts the tightest limit on every /v1 response, JSON, stream, error and list alike', async () => {
    const first = await ask(alice.api);
    expect(first.status).toBe(200);
    expect(trio(first)).toEqual({ limit: '50', remaining: '49', reset: expect.stringMatching(/^(\d+s|\d+ms|1m0s)$/) });
    const models = await alice.api.get('/v1/models');
    expect(trio(models).remaining).toBe('48');
    const invalid = await alice.api.post('/v1/chat/completions', { model: 'auto' });
    expect(invalid.status).toBe(400);
    expect(trio(invalid).remaining).toBe('47');
    const { response } = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content: prompt() }], stream: true })
      .withResponse();
    expect(response.headers.get('x-ratelimit-remaining-requests')).toBe('46');
    await response.text();
  });

  it('refuses with 429 rate_limit_exceeded and retry-after once a key is over its limit; nothing reaches the upstream', async () => {
    const bob = await gw.tenants.create();
    const put = await gw.admin.put(`/admin/rate-limits/keys/${bob.keyId}`, { requests_per_minute: 3 });
    expect(put).toMatchObject({
      status: 200,
      body: { object: 'rate_limit', scope: 'keys', id: bob.keyId, requests_per_minute: 3, tokens_per_minute: null, source: 'override' },
    });
    const served = [];
    for (let i = 0; i < 3; i++) served.push(await ask(bob.api));
    expect(served.map((r) => r.status)).toEqual([200, 200, 200]);
    expect(served.map((r) => trio(r).remaining)).toEqual(['2', '1', '0']);
    const hitsBefore = gw.stub.hits;

    const refused = await ask(bob.api);
    expect(refused).toMatchObject({ status: 429, body: { error: { type: 'rate_limit_error', code: 'rate_limit_exceeded', param: 'key' } } });
    const retryAfter = Number(refused.headers.get('retry-after'));
    expect(retryAfter).toBeGreaterThan(0);
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(trio(refused)).toMatchObject({ limit: '3', remaining: '0' });
    expect(gw.stub.hits).toBe(hitsBefore);

    // The SDK sees the OpenAI rate-limit error class.
    const sdk = new OpenAI({ apiKey: bob.key, baseURL: `${gw.url}/v1`, maxRetries: 0 });
    await expect(sdk.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'x' }] })).rejects.toBeInstanceOf(OpenAI.RateLimitError);
    expect(gw.stub.hits).toBe(hitsBefore);
  });

  it('refuses at every completion door once over the limit: stream, /v1/complete, async, a cached answer and a bad body all get the 429', async () => {
    const dave = await gw.tenants.create();
    await gw.admin.put(`/admin/rate-limits/keys/${dave.keyId}`, { requests_per_minute: 2 });
    const cached = { model: 'auto', temperature: 0, messages: [{ role: 'user', content: prompt() }] };
    expect((await dave.api.post('/v1/chat/completions', cached)).headers.get('x-gateway-cache')).toBe('miss');
    const hit = await dave.api.post('/v1/chat/completions', cached);
    expect(hit.headers.get('x-gateway-cache')).toBe('hit');
    expect(trio(hit).remaining).toBe('0');
    const hitsBefore = gw.stub.hits;
    const jobsBefore = await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue');

    const refusals = [
      await dave.api.post('/v1/chat/completions', cached),
      await dave.api.post('/v1/chat/completions', { ...cached, stream: true }),
      await dave.api.post('/v1/complete', { prompt: prompt() }),
      await dave.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: prompt() }] }, { prefer: 'respond-async' }),
      await dave.api.post('/v1/chat/completions', { model: 'auto', messages: 'not a list' }),
    ];
    for (const refused of refusals) {
      expect(refused).toMatchObject({ status: 429, body: { error: { code: 'rate_limit_exceeded', param: 'key' } } });
      expect(Number(refused.headers.get('retry-after'))).toBeGreaterThan(0);
      expect(trio(refused)).toMatchObject({ limit: '2', remaining: '0' });
      expect(refused.headers.get('x-gateway-cache')).toBeNull();
    }
    expect(gw.stub.hits).toBe(hitsBefore);
    // No job was created for the refused async submit.
    expect((await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue')).body.counts).toEqual(jobsBefore.body.counts);
  });

  it('limits a user across keys, and a department across users', async () => {
    const carol = await gw.tenants.create();
    const secondKey = await gw.admin.post<{ key: string }>('/admin/keys', { user_id: carol.userId });
    const carol2 = new ApiClient(gw.url, secondKey.body.key);
    await gw.admin.put(`/admin/rate-limits/users/${carol.userId}`, { requests_per_minute: 2 });
    expect((await ask(carol.api)).status).toBe(200);
    expect((await ask(carol2)).status).toBe(200);
    const byUser = await ask(carol.api);
    expect(byUser).toMatchObject({ status: 429, body: { error: { param: 'user' } } });

    const dave = await gw.tenants.create();
    const erin = await gw.tenants.create({ departmentId: dave.departmentId });
    await gw.admin.put(`/admin/rate-limits/departments/${dave.departmentId}`, { requests_per_minute: 3 });
    expect((await ask(dave.api)).status).toBe(200);
    expect((await ask(erin.api)).status).toBe(200);
    const third = await ask(dave.api);
    expect(third.status).toBe(200);
    expect(trio(third)).toMatchObject({ limit: '3', remaining: '0' });
    expect(await ask(erin.api)).toMatchObject({ status: 429, body: { error: { param: 'department' } } });
  });

  it('shows the limit in force, takes overrides away again, and validates input', async () => {
    const frank = await gw.tenants.create();
    const byDefault = await gw.admin.get(`/admin/rate-limits/users/${frank.userId}`);
    expect(byDefault).toMatchObject({
      status: 200,
      body: { scope: 'users', id: frank.userId, requests_per_minute: 80, tokens_per_minute: null, source: 'default' },
    });
    await gw.admin.put(`/admin/rate-limits/users/${frank.userId}`, { requests_per_minute: 7, tokens_per_minute: 1000 });
    expect(await gw.admin.get(`/admin/rate-limits/users/${frank.userId}`)).toMatchObject({
      body: { requests_per_minute: 7, tokens_per_minute: 1000, source: 'override' },
    });
    expect(trio(await ask(frank.api))).toMatchObject({ limit: '7', remaining: '6' });
    const removed = await gw.admin.delete(`/admin/rate-limits/users/${frank.userId}`);
    expect(removed).toMatchObject({ status: 200, body: { requests_per_minute: 80, source: 'default' } });

    expect(await gw.admin.put(`/admin/rate-limits/users/${frank.userId}`, { requests_per_minute: 0 })).toMatchObject({
      status: 400,
      body: { error: { code: 'invalid_value', param: 'requests_per_minute' } },
    });
    expect(await gw.admin.put(`/admin/rate-limits/users/${frank.userId}`, {})).toMatchObject({
      status: 400,
      body: { error: { code: 'missing_field', param: 'requests_per_minute' } },
    });
    expect(await gw.admin.put(`/admin/rate-limits/users/${frank.userId}`, { requests_per_minute: 5, tokens_per_minute: 'lots' })).toMatchObject({
      status: 400,
      body: { error: { param: 'tokens_per_minute' } },
    });
    expect(await gw.admin.get(`/admin/rate-limits/teams/${frank.userId}`)).toMatchObject({ status: 404, body: { error: { code: 'not_found' } } });
    expect(await gw.admin.get(`/admin/rate-limits/users/00000000-0000-4000-8000-000000000000`)).toMatchObject({ status: 404 });
    expect(await frank.api.get(`/admin/rate-limits/users/${frank.userId}`)).toMatchObject({ status: 403 });
  });

  it('limits tokens per minute once a user used them up, with the tokens trio', async () => {
    const grace = await gw.tenants.create();
    await gw.admin.put(`/admin/rate-limits/users/${grace.userId}`, { requests_per_minute: 100, tokens_per_minute: 40 });
    gw.stub.configure({ completionTokens: 30 });
    const first = await ask(grace.api);
    expect(first.status).toBe(200);
    expect(first.headers.get('x-ratelimit-limit-tokens')).toBe('40');
    expect(first.headers.get('x-ratelimit-remaining-tokens')).toBe('40');
    expect(first.headers.get('x-ratelimit-reset-tokens')).toBeTruthy();
    const second = await ask(grace.api);
    expect(second.status).toBe(200);
    expect(Number(second.headers.get('x-ratelimit-remaining-tokens'))).toBeLessThan(40);
    const third = await ask(grace.api);
    expect(third).toMatchObject({ status: 429, body: { error: { code: 'rate_limit_exceeded', param: 'user' } } });
    expect((third.body as { error: { message: string } }).error.message).toContain('tokens per minute');
    expect(third.headers.get('retry-after')).toBeTruthy();
    expect(third.headers.get('x-ratelimit-remaining-tokens')).toBe('0');
  });

  it('counts the tokens of a stream cut before its usage frame, as the budget charges them', async () => {
    const ivy = await gw.tenants.create();
    await gw.admin.put(`/admin/rate-limits/users/${ivy.userId}`, { requests_per_minute: 100, tokens_per_minute: 40 });
    // The role frame, 30 words and the finish frame reach the caller; the usage frame never comes,
    // so the budget charges an estimate of the prompt and what was produced (over 40 tokens).
    gw.stub.configure({ completionTokens: 30, cutAfterChunks: 32 });
    const cut = await postSse(gw, ivy.key, { model: 'auto', stream: true, messages: [{ role: 'user', content: prompt() }] });
    expect(cut.status).toBe(200);
    expect(cut.text).toContain('"finish_reason":"stop"');
    expect(cut.text).not.toContain('"usage"');
    gw.stub.reset();
    const next = await ask(ivy.api);
    expect(next).toMatchObject({ status: 429, body: { error: { code: 'rate_limit_exceeded', param: 'user' } } });
    expect((next.body as { error: { message: string } }).error.message).toContain('tokens per minute');
  });

  it('refuses only model calls once the tokens are used up: the job they paid for, usage and models stay readable', async () => {
    const hal = await gw.tenants.create();
    await gw.admin.put(`/admin/rate-limits/keys/${hal.keyId}`, { requests_per_minute: 100, tokens_per_minute: 10 });
    gw.stub.configure({ completionTokens: 30 });
    const submit = await hal.api.post<{ id: string }>('/v1/chat/completions', { messages: [{ role: 'user', content: 'tokens, later' }] }, { prefer: 'respond-async' });
    expect(submit.status).toBe(202);
    const job = await pollUntil(async () => {
      const res = await hal.api.get<{ status: string }>(`/v1/jobs/${submit.body.id}`);
      expect(res.status).toBe(200);
      expect(res.body.status).toBe('completed');
      return res;
    });
    // Counted as a request, not refused for tokens; and no tokens trio on a route that spends none.
    expect(job.headers.get('x-ratelimit-limit-requests')).not.toBeNull();
    expect(job.headers.get('x-ratelimit-limit-tokens')).toBeNull();
    expect((await hal.api.get('/v1/usage')).status).toBe(200);
    expect((await hal.api.get('/v1/models')).status).toBe(200);
    const call = await ask(hal.api);
    expect(call).toMatchObject({ status: 429, body: { error: { code: 'rate_limit_exceeded', param: 'key' } } });
    expect((call.body as { error: { message: string } }).error.message).toContain('tokens per minute');
    const queued = await hal.api.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'more' }] }, { prefer: 'respond-async' });
    expect(queued.status).toBe(429);
  });
});

describe('admin API limits (separate, per admin key)', () => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { RATE_LIMIT_ADMIN_RPM: '5' } });
  });
  afterAll(async () => {
    await gw.close();
  });

  it('stops a flooding admin key at its limit, without touching other keys or its /v1 quota', async () => {
    const ops = await gw.tenants.create({ role: 'admin' });
    const statuses: number[] = [];
    for (let i = 0; i < 6; i++) statuses.push((await ops.api.get('/admin/departments')).status);
    expect(statuses).toEqual([200, 200, 200, 200, 200, 429]);
    const refused = await ops.api.get('/admin/departments');
    expect(refused.headers.get('retry-after')).toBeTruthy();
    expect(refused.body).toMatchObject({ error: { param: 'admin_key' } });
    expect((await ops.api.post('/v1/chat/completions', { messages: [{ role: 'user', content: 'still fine' }] })).status).toBe(200);
    expect((await gw.admin.get('/admin/departments')).status).toBe(200);
  });
});

describe('reset header when two counters run out on the same request', () => {
  let gw: TestGateway;
  const clock = new ManualClock(Date.now());

  beforeAll(async () => {
    gw = await startTestGateway({ clock });
  });
  afterAll(async () => {
    await gw.close();
  });

  // Both the key's and the user's counters reach 0 left: the header used to name the key's (the
  // smaller limit), which resets first, and the client waiting for it was refused by the user's.
  it('names the counter that resets last, so a client that waits x-ratelimit-reset-requests out is admitted', async () => {
    const t = await gw.tenants.create();
    const other = new ApiClient(gw.url, (await gw.admin.post<{ key: string }>('/admin/keys', { user_id: t.userId })).body.key);
    await gw.admin.put(`/admin/rate-limits/users/${t.userId}`, { requests_per_minute: 3 });
    await gw.admin.put(`/admin/rate-limits/keys/${t.keyId}`, { requests_per_minute: 2 });

    expect((await other.get('/v1/models')).status).toBe(200); // t = 0: the user's window
    clock.advance(50_000);
    expect((await t.api.get('/v1/models')).status).toBe(200); // t = 50 s: the key's window, until 110 s
    clock.advance(20_000);
    expect((await other.get('/v1/models')).status).toBe(200); // t = 70 s: the user's next window, until 130 s
    clock.advance(10_000);
    expect((await other.get('/v1/models')).status).toBe(200);
    clock.advance(20_000);
    const last = await t.api.get('/v1/models'); // t = 100 s: key 2 of 2, user 3 of 3
    expect(last.status).toBe(200);
    expect(trio(last)).toEqual({ limit: '3', remaining: '0', reset: '30s' });

    clock.advance(30_000);
    expect((await t.api.get('/v1/models')).status).toBe(200);
  });
});
