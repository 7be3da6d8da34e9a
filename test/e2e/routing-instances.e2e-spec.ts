import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface Table {
  version: number;
  default_task_type: string;
  rules: Array<{ task_type: string; model: string; fallbacks: string[] }>;
}

const MODELS = ['openai/gpt-4o', 'meta-llama/llama-3.1-8b-instruct', 'anthropic/claude-3-haiku', 'mistralai/mistral-7b-instruct', 'openai/gpt-4o-mini'];

describe('routing across two instances on one PostgreSQL', () => {
  let a: TestGateway;
  let b: TestGateway;
  let user: Tenant;
  // A fresh prompt each time, so every request is routed and sent upstream (never a cached answer).
  let prompts = 0;

  beforeAll(async () => {
    a = await startTestGateway({ db: 'postgres' });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey });
    user = await a.tenants.create();
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  const tableOf = async (gw: TestGateway) => (await gw.admin.get<Table>('/admin/routing')).body;
  const withGeneral = (table: Table, model: string) => table.rules.map((r) => (r.task_type === 'general' ? { ...r, model, fallbacks: [] } : r));

  it('a change made through instance A is used by requests on instance B within 2 seconds', async () => {
    const onB = b.openai(user.key);
    const delays: number[] = [];
    for (const model of MODELS) {
      const table = await tableOf(a);
      const res = await a.admin.put<Table>('/admin/routing', {
        version: table.version,
        default_task_type: table.default_task_type,
        rules: withGeneral(table, model),
        comment: `general → ${model}`,
      });
      expect(res.status).toBe(200);
      const changedAt = performance.now();
      // Real requests on B until one is routed by the new version; never longer than the contract allows.
      const seen = await pollUntil(
        async () => {
          const { data, response } = await onB.chat.completions
            .create({ model: 'auto', messages: [{ role: 'user', content: `which model? #${++prompts}` }] })
            .withResponse();
          expect(response.headers.get('x-gateway-route')).toContain(`version=${res.body.version}`);
          return { model: data.model, header: response.headers.get('x-gateway-model') };
        },
        2000,
        10,
      );
      delays.push(Math.round(performance.now() - changedAt));
      expect(seen).toEqual({ model, header: model });
    }
    // The issue asks for the measured propagation delay: printed for the record, asserted only by the 2 s bound above.
    const sorted = [...delays].sort((x, y) => x - y);
    console.log(
      `routing propagation A → B (ms, ROUTING_REFRESH_MS=${b.config.routing.refreshMs}): ${delays.join(', ')}; median ${sorted[Math.floor(sorted.length / 2)]}, max ${sorted.at(-1)}`,
    );
  });

  it("GET of a department's overrides on B shows the version A just made, so a PUT based on it is not stale", async () => {
    const dept = user.departmentId;
    const before = (await tableOf(a)).version;
    const put = await a.admin.put<{ version: number }>(`/admin/routing/departments/${dept}`, { version: before, overrides: [] });
    expect(put.status).toBe(200);
    const read = await b.admin.get<{ version: number }>(`/admin/routing/departments/${dept}`);
    expect(read.body.version).toBe(put.body.version);
    expect((await b.admin.put(`/admin/routing/departments/${dept}`, { version: read.body.version, overrides: [] })).status).toBe(200);
  });

  it('of concurrent PUTs based on the same version, exactly one wins and the others get 409', async () => {
    for (let round = 0; round < 5; round++) {
      const table = await tableOf(a);
      const contenders = [a, b, a, b].map((gw, i) =>
        gw.admin.put<{ version: number; error?: { code: string } }>('/admin/routing', {
          version: table.version,
          default_task_type: table.default_task_type,
          rules: withGeneral(table, MODELS[i]),
          comment: `round ${round}, contender ${i}`,
        }),
      );
      const results = await Promise.all(contenders);
      const statuses = results.map((r) => r.status).sort();
      expect(statuses).toEqual([200, 409, 409, 409]);
      expect(results.find((r) => r.status === 200)?.body.version).toBe(table.version + 1);
      for (const r of results.filter((x) => x.status === 409)) expect(r.body.error?.code).toBe('conflict');
    }
    // History has no gap and no duplicate: every write that won is one version.
    const versions = (await b.admin.get<{ data: Array<{ version: number; based_on: number | null }> }>('/admin/routing/versions?limit=500')).body.data;
    expect(versions.map((v) => v.version)).toEqual(Array.from({ length: versions.length }, (_, i) => versions.length - i));
    for (const v of versions.slice(0, -1)) expect(v.based_on).toBe(v.version - 1);
  });

  it('a rollback through B reaches A too', async () => {
    const rolled = await b.admin.post<{ version: number }>('/admin/routing/rollback/1', {});
    expect(rolled.status).toBe(201);
    await pollUntil(async () => {
      const res = await user.api.post<{ model: string }>('/v1/chat/completions', { messages: [{ role: 'user', content: `rollback #${++prompts}` }] });
      expect(res.headers.get('x-gateway-route')).toBe(`task_type=general; rule=general; version=${rolled.body.version}`);
      expect(res.body.model).toBe('openai/gpt-4o-mini');
    }, 2000);
  });
});
