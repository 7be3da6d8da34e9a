import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../../libs/stub-upstream/src/index.js';
import { provisionTenant, SHIPPED_MEMORY, type StartedGateway, startGateway } from '../../bench/targets.js';
import { assertBundleIsFresh, BUNDLE } from '../support/bundle.js';
import { createPostgresDatabase, REDIS_URL } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';
import { dropRedisKeys, uniqueRedisPrefix } from '../support/redis.js';

/**
 * The artifact that ships: `npm start` and the image run dist/bundle/main.js (scripts/bundle.mjs),
 * not the TypeScript the other e2e suites load. A dependency the bundler resolved differently,
 * an asset it left behind or a lazy chunk that fails to load shows up only here, so this starts
 * the built bundle as its own process, in both configurations, and walks the paths a user takes.
 * `npm test` builds it first.
 */



interface Walked {
  models: string[];
  jsonContent: string;
  jsonCache: string | null;
  repeatCache: string | null;
  streamed: string;
  streamDone: boolean;
}

/** The calls a user makes, with the official SDK, through the gateway under test. */
async function walk(gateway: StartedGateway, key: string): Promise<Walked> {
  const openai = new OpenAI({ apiKey: key, baseURL: `${gateway.origin}/v1`, maxRetries: 0 });
  const models = (await openai.models.list()).data.map((m) => m.id);
  const ask = { model: 'auto', messages: [{ role: 'user' as const, content: `shipped build ${gateway.name}` }], temperature: 0 };
  const first = await openai.chat.completions.create(ask).withResponse();
  const repeat = await openai.chat.completions.create(ask).withResponse();
  const stream = await openai.chat.completions.create({ ...ask, messages: [{ role: 'user', content: `stream ${gateway.name}` }], stream: true });
  let streamed = '';
  let streamDone = false;
  for await (const chunk of stream) {
    streamed += chunk.choices[0]?.delta.content ?? '';
    if (chunk.choices[0]?.finish_reason) streamDone = true;
  }
  return {
    models,
    jsonContent: first.data.choices[0]?.message.content ?? '',
    jsonCache: first.response.headers.get('x-gateway-cache'),
    repeatCache: repeat.response.headers.get('x-gateway-cache'),
    streamed,
    streamDone,
  };
}

describe('the shipped build (dist/bundle/main.js) as its own process', () => {
  beforeAll(() => {
    assertBundleIsFresh();
  });

  describe('production configuration: PostgreSQL, Redis, an upstream', () => {
    let stub: StubUpstream;
    let database: { url: string; drop(): Promise<void> };
    let gateway: StartedGateway | undefined;
    const prefix = uniqueRedisPrefix('shipped');

    beforeAll(async () => {
      stub = await startStubUpstream();
      database = await createPostgresDatabase();
      gateway = await startGateway({
        name: 'shipped',
        flavour: 'production',
        stubUrl: stub.url,
        databaseUrl: database.url,
        ...SHIPPED_MEMORY,
        entry: BUNDLE,
        env: { REDIS_URL, REDIS_KEY_PREFIX: prefix, LOG_LEVEL: 'info' },
      });
    });
    afterAll(async () => {
      await gateway?.cleanup();
      await stub?.close();
      await database?.drop();
      await dropRedisKeys(prefix);
    });

    it('serves a provisioned key through the upstream, caches in Redis, streams, and reports itself ready', async () => {
      const started = gateway as StartedGateway;
      const tenant = await provisionTenant(started.origin, started.adminKey);
      expect(tenant.budgetActive).toBe(true);

      const walked = await walk(started, tenant.key);
      expect(walked.models.length).toBeGreaterThan(0);
      expect(walked.jsonContent).toContain('shipped build shipped');
      expect(walked.jsonCache).toBe('miss');
      expect(walked.repeatCache).toBe('hit');
      expect(walked.streamed).toContain('stream shipped');
      expect(walked.streamDone).toBe(true);
      // The miss and the stream reached the upstream; the hit did not.
      expect(stub.hits).toBe(2);

      const ready = await fetch(`${started.origin}/health/ready`);
      const health = (await ready.json()) as { status: string; info: Record<string, { status: string; driver?: string }> };
      expect(ready.status).toBe(200);
      expect(health.info.database?.driver).toBe('postgres');
      expect(health.info.cache?.driver).toBe('redis');
      expect(health.info.queue?.driver).toBe('bullmq');

      // What the gateway spent is on record in PostgreSQL and visible to the caller.
      const usage = await fetch(`${started.origin}/v1/usage`, { headers: { authorization: `Bearer ${tenant.key}` } });
      expect(usage.status).toBe(200);
      const spend = ((await usage.json()) as { spend: Array<{ requests: number }> }).spend;
      expect(spend.reduce((n, row) => n + row.requests, 0)).toBeGreaterThanOrEqual(2);
    });

    it('runs an async job on BullMQ to completion', async () => {
      const started = gateway as StartedGateway;
      const tenant = await provisionTenant(started.origin, started.adminKey);
      const headers = { authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json' };
      const submit = await fetch(`${started.origin}/v1/chat/completions`, {
        method: 'POST',
        headers: { ...headers, prefer: 'respond-async' },
        body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'async shipped' }] }),
      });
      expect(submit.status).toBe(202);
      const { id } = (await submit.json()) as { id: string };
      type Job = { status: string; result: { choices: Array<{ message: { content: string } }> } | null };
      const job = await pollUntil(
        async () => {
          const polled = (await (await fetch(`${started.origin}/v1/jobs/${id}`, { headers })).json()) as Job;
          expect(['completed', 'failed']).toContain(polled.status);
          return polled;
        },
        10_000,
        50,
      );
      expect(job.status).toBe('completed');
      expect(job.result?.choices[0]?.message.content).toContain('async shipped');
    });

    it('serves the metrics and the API docs, whose assets come from node_modules at run time', async () => {
      const started = gateway as StartedGateway;
      const metrics = await fetch(`${started.origin}/metrics`);
      expect(metrics.status).toBe(200);
      expect(await metrics.text()).toMatch(/^gatehouse_requests_total\{/m);
      const docs = await fetch(`${started.origin}/docs/openapi.json`);
      expect(docs.status).toBe(200);
      expect(((await docs.json()) as { paths: Record<string, unknown> }).paths).toHaveProperty('/v1/chat/completions');
      const ui = await fetch(`${started.origin}/docs/swagger-ui-bundle.js`);
      expect(ui.status).toBe(200);
      expect((await ui.text()).length).toBeGreaterThan(100_000);
    });

    it('shuts down on SIGTERM without being killed', async () => {
      const started = gateway as StartedGateway;
      // NodeProcess.stop sends SIGTERM and escalates to SIGKILL after its grace period.
      await started.proc.stop(20_000);
      expect(started.proc.exitSignal).not.toBe('SIGKILL');
      expect(started.proc.stderrTail()).toContain('"msg":"drained"');
    });
  });

  describe('embedded default: PGlite and the mock upstream, no server', () => {
    let gateway: StartedGateway | undefined;
    let stub: StubUpstream;

    beforeAll(async () => {
      stub = await startStubUpstream();
      gateway = await startGateway({
        name: 'shipped-embedded',
        flavour: 'embedded',
        stubUrl: stub.url,
        ...SHIPPED_MEMORY,
        entry: BUNDLE,
        // No upstream key: the built-in mock answers (its lazily loaded chunk must be there).
        env: { OPENROUTER_API_KEY: '', OPENROUTER_BASE_URL: '' },
      });
    });
    afterAll(async () => {
      await gateway?.cleanup();
      await stub?.close();
    });

    it('answers from the marked mock on PGlite', async () => {
      const started = gateway as StartedGateway;
      const tenant = await provisionTenant(started.origin, started.adminKey);
      const openai = new OpenAI({ apiKey: tenant.key, baseURL: `${started.origin}/v1`, maxRetries: 0 });
      const { data, response } = await openai.chat.completions
        .create({ model: 'auto', messages: [{ role: 'user', content: 'embedded shipped' }] })
        .withResponse();
      expect(data.choices[0]?.message.content).toContain('embedded shipped');
      expect(response.headers.get('x-gateway-upstream')).toBe('mock');
      expect(stub.hits).toBe(0);
      const health = (await (await fetch(`${started.origin}/health/ready`)).json()) as { info: Record<string, { driver?: string }> };
      expect(health.info.database?.driver).toBe('pglite');
    });
  });
});
