import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { FRESH, MAX_TOKENS, MODEL, REQUEST, worstCaseNanos } from '../integration/budget-support.js';
import { ApiClient, leaveMidway, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Prometheus text format → samples (enough of the format for what the exporter writes). */
function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) throw new Error(`not a Prometheus sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const pair of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1] ?? ''] = pair[2] ?? '';
    samples.push({ name: match[1] ?? '', labels, value: Number(match[3]) });
  }
  return samples;
}

/** Sum of the series of `name` whose labels include `labels` (metrics are per process: compare deltas). */
function valueOf(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((sum, s) => sum + s.value, 0);
}

describe('GET /metrics (Prometheus, same port, no key)', () => {
  let gw: TestGateway;
  let anonymous: ApiClient;

  async function scrape(): Promise<Sample[]> {
    const res = await anonymous.get<string>('/metrics');
    expect(res.status).toBe(200);
    return parsePrometheus(res.body);
  }

  beforeAll(async () => {
    gw = await startTestGateway({ env: { RATE_LIMIT_KEY_RPM: '3', UPSTREAM_RETRY_ATTEMPTS: '1' } });
    anonymous = new ApiClient(gw.url, undefined);
  });
  afterAll(async () => {
    await gw.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('serves Prometheus text without an API key', async () => {
    const zoe = await gw.tenants.create();
    expect((await zoe.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'hello' }] })).status).toBe(200);
    const res = await fetch(`${gw.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
    const text = await res.text();
    expect(text).toContain('# TYPE gatehouse_requests_total counter');
    expect(text).toContain('# TYPE gatehouse_upstream_attempt_duration_seconds histogram');
    expect(text).toContain('# TYPE gatehouse_streams_in_flight gauge');
    // Nothing secret: no upstream key, no admin key.
    expect(text).not.toContain('sk-test-upstream-secret');
    expect(text).not.toContain(gw.adminKey);
  });

  it('counts one completion by door, status, model, cache and outcome, with its tokens, cost and upstream latency', async () => {
    const alice = await gw.tenants.create();
    const before = await scrape();
    const { data, response } = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content: 'count me once' }] })
      .withResponse();
    expect(data.model).toBe('openai/gpt-4o-mini');
    const after = await scrape();
    const delta = (name: string, labels: Record<string, string>) => valueOf(after, name, labels) - valueOf(before, name, labels);

    const series = after.filter((s) => s.name === 'gatehouse_requests_total' && s.labels.model === 'openai/gpt-4o-mini' && s.labels.outcome === 'ok');
    expect(series.length).toBeGreaterThan(0);
    expect(series[0]?.labels).toMatchObject({ door: 'chat', status: '200', model: 'openai/gpt-4o-mini', outcome: 'ok' });
    expect(['miss', 'bypass']).toContain(series[0]?.labels.cache);
    expect(delta('gatehouse_requests_total', { door: 'chat', status: '200', model: 'openai/gpt-4o-mini', outcome: 'ok' })).toBe(1);

    expect(delta('gatehouse_tokens_total', { model: 'openai/gpt-4o-mini', type: 'prompt' })).toBe(data.usage?.prompt_tokens);
    expect(delta('gatehouse_tokens_total', { model: 'openai/gpt-4o-mini', type: 'completion' })).toBe(data.usage?.completion_tokens);
    // The counter is summed in integer nano-dollars and exported in USD: it matches the charged cost header.
    const charged = Number(response.headers.get('x-gateway-cost-usd'));
    expect(charged).toBeGreaterThan(0);
    expect(delta('gatehouse_cost_usd_total', { model: 'openai/gpt-4o-mini' })).toBeCloseTo(charged, 12);

    expect(delta('gatehouse_upstream_attempt_duration_seconds_count', { model: 'openai/gpt-4o-mini', outcome: 'ok' })).toBe(1);
    expect(delta('gatehouse_http_request_duration_seconds_count', { method: 'POST', route: '/v1/chat/completions', status: '200' })).toBe(1);
  });

  it('labels failed upstream attempts by outcome and the refused call by its status', async () => {
    const bob = await gw.tenants.create();
    gw.stub.configure({ status: 500 });
    const before = await scrape();
    const res = await bob.api.post<{ error: { code: string } }>('/v1/chat/completions', {
      model: 'openai/gpt-4o',
      messages: [{ role: 'user', content: 'fail' }],
    });
    expect(res.status).toBe(502);
    const after = await scrape();
    const delta = (name: string, labels: Record<string, string>) => valueOf(after, name, labels) - valueOf(before, name, labels);
    expect(delta('gatehouse_upstream_attempt_duration_seconds_count', { model: 'openai/gpt-4o', outcome: 'http_500' })).toBeGreaterThanOrEqual(1);
    expect(delta('gatehouse_requests_total', { door: 'chat', status: '502', outcome: res.body.error.code })).toBe(1);
  });

  it('labels a model the caller made up as "other", so made-up names cannot fill the series', async () => {
    const before = await scrape();
    const made = `made-up/model-${Date.now()}`;
    const res = await (await gw.tenants.create()).api.post('/v1/chat/completions', { model: made, messages: [{ role: 'user', content: 'any name' }] });
    expect(res.status).toBe(200);
    const after = await scrape();
    expect(after.some((s) => Object.values(s.labels).includes(made))).toBe(false);
    const delta = (name: string, labels: Record<string, string>) => valueOf(after, name, labels) - valueOf(before, name, labels);
    expect(delta('gatehouse_requests_total', { door: 'chat', status: '200', model: 'other', outcome: 'ok' })).toBe(1);
    expect(delta('gatehouse_upstream_attempt_duration_seconds_count', { model: 'other', outcome: 'ok' })).toBe(1);
    expect(delta('gatehouse_tokens_total', { model: 'other', type: 'completion' })).toBeGreaterThan(0);
  });

  it("labels the caller's own `models` after 'auto' by the same rule: 'other' unless the gateway has a price for it", async () => {
    const alice = await gw.tenants.create();
    // 'auto' asks the routing table's model first; failing, the caller's fallbacks are asked.
    const tableModel = 'openai/gpt-4o-mini';
    gw.stub.configure({ models: { [tableModel]: { status: 404 } } });
    const before = await scrape();
    const made = [1, 2].map((n) => `made-up/auto-fallback-${n}-${Date.now()}`);
    for (const models of [[made[0]], [made[1]], ['openai/gpt-4o']]) {
      const res = await alice.api.post('/v1/chat/completions', { model: 'auto', models, messages: [{ role: 'user', content: `fallbacks ${models.join()}` }] });
      expect(res.status).toBe(200);
    }
    const after = await scrape();
    expect(after.filter((s) => made.some((name) => Object.values(s.labels).includes(name)))).toEqual([]);
    const delta = (name: string, labels: Record<string, string>) => valueOf(after, name, labels) - valueOf(before, name, labels);
    expect(delta('gatehouse_requests_total', { door: 'chat', status: '200', model: 'other', outcome: 'ok' })).toBe(2);
    expect(delta('gatehouse_requests_total', { door: 'chat', status: '200', model: 'openai/gpt-4o', outcome: 'ok' })).toBe(1);
    expect(delta('gatehouse_upstream_attempt_duration_seconds_count', { model: tableModel, outcome: 'http_404' })).toBe(3);
  });

  // Before, a response whose caller left was missing from the HTTP histogram: Fastify runs no
  // onResponse for a connection that closed before the response finished.
  it('counts a request whose caller left before the answer as 499, and a stream it left as its 200', async () => {
    const erin = await gw.tenants.create();
    const before = await scrape();
    const leave = (body: Record<string, unknown>, afterFirstChunk: boolean) => leaveMidway(gw, erin.key, body, { afterFirstChunk });
    gw.stub.configure({ latencyMs: 1500 });
    await leave({}, false);
    gw.stub.configure({ latencyMs: 0, chunkDelayMs: 300, completionTokens: 20 });
    await leave({ stream: true }, true);
    await pollUntil(async () => {
      const after = await scrape();
      const delta = (labels: Record<string, string>) =>
        valueOf(after, 'gatehouse_http_request_duration_seconds_count', { method: 'POST', route: '/v1/chat/completions', ...labels }) -
        valueOf(before, 'gatehouse_http_request_duration_seconds_count', { method: 'POST', route: '/v1/chat/completions', ...labels });
      expect(delta({ status: '499' })).toBe(1);
      expect(delta({ status: '200' })).toBe(1);
    });
  });

  it('counts refusals by reason: auth, rate_limit and budget', async () => {
    const carol = await gw.tenants.create();
    const dave = await gw.tenants.create();
    const before = await scrape();

    const badKey = await new ApiClient(gw.url, 'gh-not-a-real-key-000000000000').post('/v1/chat/completions', {
      model: 'auto',
      messages: [{ role: 'user', content: 'x' }],
    });
    expect(badKey.status).toBe(401);

    // RATE_LIMIT_KEY_RPM=3: the fourth call within the minute is refused.
    const statuses: number[] = [];
    for (let n = 0; n < 4; n++) statuses.push((await carol.api.get('/v1/models')).status);
    expect(statuses).toEqual([200, 200, 200, 429]);

    const budget = await gw.admin.put(`/admin/budgets/users/${dave.userId}`, { limit_usd: 0.000000001, period: 'total' });
    expect(budget.status).toBe(200);
    const broke = await dave.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'too expensive' }] });
    expect(broke.status).toBe(402);

    const after = await scrape();
    const delta = (reason: string) =>
      valueOf(after, 'gatehouse_rejected_requests_total', { reason }) - valueOf(before, 'gatehouse_rejected_requests_total', { reason });
    expect(delta('auth')).toBe(1);
    expect(delta('rate_limit')).toBe(1);
    expect(delta('budget')).toBe(1);
  });

  it('shows a stream in flight while it runs, and not after it ended', async () => {
    const erin = await gw.tenants.create();
    const baseline = valueOf(await scrape(), 'gatehouse_streams_in_flight');
    gw.stub.configure({ chunkDelayMs: 100, completionTokens: 8 });
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${erin.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content: 'slow stream' }] }),
    });
    expect(res.status).toBe(200);
    const body = res.text();
    await pollUntil(async () => expect(valueOf(await scrape(), 'gatehouse_streams_in_flight')).toBe(baseline + 1));
    expect(await body).toContain('data: [DONE]');
    await pollUntil(async () => expect(valueOf(await scrape(), 'gatehouse_streams_in_flight')).toBe(baseline));
  });
});

describe('GET /metrics: jobs', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    // Polling the jobs must not run into a rate limit.
    gw = await startTestGateway({ env: { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000' } });
  });
  afterAll(async () => {
    await gw.close();
  });

  it('counts a job refused by its budget when it runs under reason=budget, as a refused HTTP call is counted', async () => {
    // Enough for one job: both are accepted, the second is refused once the first holds the budget.
    const erin = await gw.tenants.create({ userBudgetUsd: formatUsd(worstCaseNanos(gw, REQUEST, [MODEL], MAX_TOKENS)), period: 'total' });
    const scrape = async () => parsePrometheus((await new ApiClient(gw.url, undefined).get<string>('/metrics')).body);
    const before = await scrape();
    gw.stub.configure({ latencyMs: 2000 });
    const submit = () => erin.api.post<{ id: string }>('/v1/chat/completions', REQUEST, { prefer: 'respond-async', ...FRESH });
    const submitted = [await submit(), await submit()];
    expect(submitted.map((res) => res.status)).toEqual([202, 202]);
    const outcomes = await Promise.all(
      submitted.map((res) =>
        pollUntil(async () => {
          const job = await erin.api.get<{ status: string; error: { code: string } | null }>(`/v1/jobs/${res.body.id}`);
          expect(['completed', 'failed']).toContain(job.body.status);
          return job.body.error?.code ?? job.body.status;
        }, 20_000),
      ),
    );
    expect(outcomes.sort()).toEqual(['budget_exceeded', 'completed']);
    const after = await scrape();
    const delta = (name: string, labels: Record<string, string>) => valueOf(after, name, labels) - valueOf(before, name, labels);
    expect(delta('gatehouse_rejected_requests_total', { reason: 'budget' })).toBe(1);
    expect(delta('gatehouse_requests_total', { door: 'job' })).toBe(1);
    expect(delta('gatehouse_requests_total', { door: 'job', status: '200', outcome: 'ok' })).toBe(1);
  });
});

describe('GET /metrics with METRICS_TOKEN', () => {
  let gw: TestGateway;
  const token = 'metrics-token-0123456789abcdef';

  beforeAll(async () => {
    gw = await startTestGateway({ env: { METRICS_TOKEN: token } });
  });
  afterAll(async () => {
    await gw.close();
  });

  it('refuses a scrape without the token, or with another one, in the OpenAI error envelope', async () => {
    for (const key of [undefined, 'metrics-token-wrong-wrong-wrong', gw.adminKey]) {
      const res = await new ApiClient(gw.url, key).get<{ error: { code: string } }>('/metrics');
      expect(res.status).toBe(401);
      expect(res.body.error.code).toBe('invalid_api_key');
    }
  });

  it('serves the scrape with the token', async () => {
    const res = await new ApiClient(gw.url, token).get<string>('/metrics');
    expect(res.status).toBe(200);
    expect(res.body).toContain('gatehouse_requests_total');
  });
});
