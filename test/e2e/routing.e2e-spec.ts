import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { AppConfig } from '../../src/config/config.js';
import { RoutingVersionsRepository } from '../../src/routing/routing-versions.repository.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface Rule {
  task_type: string;
  model: string;
  fallbacks: string[];
  max_tokens?: number;
  default_max_tokens?: number;
  cache?: { enabled: boolean; ttl_seconds?: number };
  department_overridable?: boolean;
}
interface Table {
  version: number;
  default_task_type: string;
  rules: Rule[];
  department_overrides?: Array<Record<string, unknown>>;
  updated_by: string;
  updated_at: string;
  comment: string | null;
  based_on: number | null;
  restored_from: number | null;
}
interface ErrorBody {
  error: { message: string; type: string; code: string; param: string | null; problems?: Array<{ param: string; message: string }> };
}

const SONNET = 'anthropic/claude-3.5-sonnet';
const MINI = 'openai/gpt-4o-mini';
const GPT4O = 'openai/gpt-4o';
const LLAMA = 'meta-llama/llama-3.1-8b-instruct';

describe('routing tables changed at runtime (admin API, versions, resolve; PGlite)', () => {
  let gw: TestGateway;
  let admin: Tenant;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway();
    admin = await gw.tenants.create({ role: 'admin' });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const current = async () => (await admin.api.get<Table>('/admin/routing')).body;
  // A fresh prompt each time, so every request is routed and sent upstream (never a cached answer).
  let prompts = 0;
  const chat = (who: Tenant, body: Record<string, unknown>) =>
    who.api.post<{ model: string }>('/v1/chat/completions', { messages: [{ role: 'user', content: `hello #${++prompts}` }], ...body });
  /** A whole table PUT, based on the current version. */
  const put = async (changes: Partial<Table> & { comment?: string }, based?: number) => {
    const now = await current();
    return admin.api.put<Table & ErrorBody>('/admin/routing', {
      version: based ?? now.version,
      default_task_type: changes.default_task_type ?? now.default_task_type,
      rules: changes.rules ?? now.rules,
      ...(changes.department_overrides ? { department_overrides: changes.department_overrides } : {}),
      ...(changes.comment ? { comment: changes.comment } : {}),
    });
  };

  it('starts from the reference table of API.md as version 1', async () => {
    const res = await admin.api.get<Table>('/admin/routing');
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ version: 1, default_task_type: 'general', updated_by: 'system', based_on: null });
    expect(res.body.rules.map((r) => [r.task_type, r.model, r.fallbacks])).toEqual([
      ['classification', MINI, []],
      ['code', SONNET, [MINI]],
      ['analysis', SONNET, [MINI]],
      ['general', MINI, []],
      ['budget', LLAMA, [MINI]],
    ]);
  });

  it('refuses a bad table with 400 listing every problem, and saves nothing', async () => {
    const before = await admin.api.get<{ data: Table[] }>('/admin/routing/versions');
    const res = await admin.api.put<ErrorBody>('/admin/routing', {
      version: 1,
      default_task_type: 'missing',
      surprise: true,
      rules: [
        { task_type: 'code', model: SONNET, fallbacks: [MINI, SONNET], max_tokens: 0 },
        { task_type: 'general', model: '', fallbacks: [] },
      ],
    });
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_value', param: 'surprise' });
    expect(res.body.error.problems?.map((p) => p.param)).toEqual([
      'surprise',
      'rules[0].fallbacks[1]',
      'rules[0].max_tokens',
      'rules[1].model',
      'default_task_type',
    ]);
    expect(res.body.error.message).toContain('5 problems');
    for (const words of ["unknown field 'surprise'", 'fallback cycle', 'must be greater than 0', 'empty model list', 'no default rule']) {
      expect(res.body.error.message).toContain(words);
    }
    const after = await admin.api.get<{ data: Table[] }>('/admin/routing/versions');
    expect(after.body.data.map((t) => t.version)).toEqual(before.body.data.map((t) => t.version));
    expect((await current()).version).toBe(before.body.data[0]?.version);

    const missingVersion = await admin.api.put<ErrorBody>('/admin/routing', {
      default_task_type: 'general',
      rules: [{ task_type: 'general', model: MINI, fallbacks: [] }],
    });
    expect(missingVersion).toMatchObject({ status: 400, body: { error: { param: 'version' } } });
  });

  it('is for admins only', async () => {
    expect((await alice.api.get('/admin/routing')).status).toBe(403);
    expect((await alice.api.put('/admin/routing', {})).status).toBe(403);
    expect((await alice.api.post('/admin/routing/resolve', {})).status).toBe(403);
  });

  it('applies a new version at once, with author and comment, and serves it to requests', async () => {
    const before = await current();
    const rules = before.rules.map((r) => (r.task_type === 'general' ? { ...r, model: GPT4O, fallbacks: [MINI], max_tokens: 300, default_max_tokens: 40 } : r));
    const res = await put({ rules, comment: 'general goes to gpt-4o' });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ version: before.version + 1, based_on: before.version, updated_by: admin.userId, comment: 'general goes to gpt-4o' });

    const answer = await chat(alice, {});
    expect(answer.status).toBe(200);
    expect(answer.body.model).toBe(GPT4O);
    expect(answer.headers.get('x-gateway-route')).toBe(`task_type=general; rule=general; version=${before.version + 1}`);
    // No max_tokens in the request: the rule's default is sent (and a larger one is capped).
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ model: GPT4O, max_tokens: 40 });
    await chat(alice, { max_tokens: 5000 });
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ max_tokens: 300 });
  });

  it('answers 409 conflict to a change based on a stale version', async () => {
    const now = await current();
    const first = await put({ comment: 'first' }, now.version);
    expect(first.status).toBe(200);
    const stale = await put({ comment: 'second, based on the same version' }, now.version);
    expect(stale.status).toBe(409);
    expect(stale.body.error).toMatchObject({ type: 'conflict_error', code: 'conflict', param: 'version' });
    expect((await current()).version).toBe(now.version + 1);
  });

  it('lists versions newest first and shows any one of them', async () => {
    const list = await admin.api.get<{ object: string; data: Table[] }>('/admin/routing/versions');
    expect(list.status).toBe(200);
    const versions = list.body.data.map((t) => t.version);
    expect(versions).toEqual([...versions].sort((a, b) => b - a));
    expect(versions.at(-1)).toBe(1);
    expect(list.body.data[0]).toMatchObject({ updated_by: admin.userId });
    const paged = await admin.api.get<{ data: Table[] }>(`/admin/routing/versions?limit=1&before=${versions[0]}`);
    expect(paged.body.data.map((t) => t.version)).toEqual([versions[1]]);
    const one = await admin.api.get<Table>('/admin/routing/versions/1');
    expect(one.body).toMatchObject({ version: 1, updated_by: 'system' });
    expect((await admin.api.get<ErrorBody>('/admin/routing/versions/9999')).status).toBe(404);
    expect((await admin.api.get<ErrorBody>('/admin/routing/versions/abc')).status).toBe(404);
    expect((await admin.api.get<ErrorBody>('/admin/routing/versions?limit=0')).status).toBe(400);
  });

  it('rolls back to an earlier table as a new version, which requests then use', async () => {
    const now = await current();
    const res = await admin.api.post<Table & ErrorBody>('/admin/routing/rollback/1', { comment: 'back to the reference table' });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({
      version: now.version + 1,
      restored_from: 1,
      based_on: now.version,
      updated_by: admin.userId,
      comment: 'back to the reference table',
    });
    const seed = (await admin.api.get<Table>('/admin/routing/versions/1')).body;
    expect(res.body.rules).toEqual(seed.rules);
    expect(res.body.default_task_type).toBe(seed.default_task_type);

    const answer = await chat(alice, {});
    expect(answer.body.model).toBe(MINI);
    expect(answer.headers.get('x-gateway-route')).toBe(`task_type=general; rule=general; version=${now.version + 1}`);
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ max_tokens: 1024 });

    expect((await admin.api.post<ErrorBody>('/admin/routing/rollback/9999', {})).status).toBe(404);
    const stale = await admin.api.post<ErrorBody>('/admin/routing/rollback/1', { version: now.version });
    expect(stale).toMatchObject({ status: 409, body: { error: { code: 'conflict' } } });
  });

  it('refuses a rollback to a table today\'s config refuses, as a PUT of it would be', async () => {
    // A version written under a higher DEFAULT_MAX_TOKENS (an instance configured so): its general
    // rule, without a cap of its own, defaults to more than this instance's DEFAULT_MAX_TOKENS.
    const cap = gw.gateway.app.get(AppConfig).routing.defaultMaxTokens;
    const now = await current();
    const rules = now.rules.map((r) => (r.task_type === 'general' ? { ...r, max_tokens: undefined, default_max_tokens: cap + 1 } : r));
    const written = await gw.gateway.app
      .get(RoutingVersionsRepository)
      .append({ basedOn: now.version, body: { default_task_type: now.default_task_type, rules, allowed_models: null }, author: 'older-release', comment: null });
    expect(written).toBeDefined();
    const back = await put({ rules: now.rules });
    expect(back.status).toBe(200);
    const refused = await admin.api.post<ErrorBody>(`/admin/routing/rollback/${written?.version}`, {});
    expect(refused).toMatchObject({ status: 400, body: { error: { code: 'invalid_value' } } });
    expect(refused.body.error.param).toMatch(/default_max_tokens/);
    expect((await current()).version).toBe(back.body.version);
  });

  it('resolve answers exactly what a real request then gets, department overrides included', async () => {
    const dept = alice.departmentId;
    const now = await current();
    const rules = now.rules.map((r) =>
      r.task_type === 'code'
        ? { ...r, max_tokens: 2000, default_max_tokens: 700, cache: { enabled: true, ttl_seconds: 120 }, department_overridable: true }
        : r,
    );
    const changed = await put({
      rules,
      department_overrides: [{ department_id: dept, task_type: 'code', model: GPT4O, max_tokens: 90 }],
      comment: "alice's department codes on gpt-4o",
    });
    expect(changed.status).toBe(200);
    const bob = await gw.tenants.create();

    for (const [who, request, expected] of [
      [alice, { task_type: 'code' }, { model: GPT4O, fallbacks: [MINI], max_tokens: 90, department_override: dept }],
      [bob, { task_type: 'code' }, { model: SONNET, fallbacks: [MINI], max_tokens: 700, department_override: null }],
      [bob, { task_type: 'code', max_tokens: 1500 }, { model: SONNET, max_tokens: 1500 }],
      [bob, { task_type: 'poetry', model: LLAMA }, { model: LLAMA, fallbacks: [], rule: 'general', explicit_model: true }],
    ] as const) {
      gw.stub.reset();
      const dry = await admin.api.post<Record<string, unknown>>('/admin/routing/resolve', { ...request, user_id: who.userId });
      expect(dry.status).toBe(200);
      expect(dry.body).toMatchObject({ version: changed.body.version, ...expected });
      expect(gw.stub.hits).toBe(0); // a dry run calls no model

      const real = await chat(who, request);
      expect(real.status).toBe(200);
      expect(real.headers.get('x-gateway-route')).toBe(dry.body.route_header);
      expect(real.headers.get('x-gateway-model')).toBe(dry.body.model);
      expect(gw.stub.requests.at(-1)?.body).toMatchObject({ model: dry.body.model, max_tokens: dry.body.max_tokens });
    }
    const withCache = await admin.api.post<Record<string, unknown>>('/admin/routing/resolve', { task_type: 'code' });
    expect(withCache.body).toMatchObject({ cache: { enabled: true, ttl_seconds: 120 }, max_tokens_cap: 2000, department_override: null });
    expect((await admin.api.post<Record<string, unknown>>('/admin/routing/resolve', { task_type: 'code', department_id: dept })).body).toMatchObject({
      model: GPT4O,
    });
    expect((await admin.api.post<Record<string, unknown>>('/admin/routing/resolve', { task_type: 'code', version: 1 })).body).toMatchObject({
      version: 1,
      max_tokens: 1024,
    });

    expect((await admin.api.post<ErrorBody>('/admin/routing/resolve', { user_id: '00000000-0000-4000-8000-000000000000' })).status).toBe(404);
    // A department that does not exist is 404 too, not answered as one without an override.
    expect(await admin.api.post<ErrorBody>('/admin/routing/resolve', { department_id: '00000000-0000-4000-8000-000000000000' })).toMatchObject({
      status: 404,
      body: { error: { code: 'not_found' } },
    });
    expect((await admin.api.post<ErrorBody>('/admin/routing/resolve', { task_type: 'bad name!' })).body.error.param).toBe('task_type');
    expect((await admin.api.post<ErrorBody>('/admin/routing/resolve', { tasktype: 'code' })).body.error.param).toBe('tasktype');
    // A default above the cap that applies without max_tokens (DEFAULT_MAX_TOKENS, 1024) was stored
    // and quietly lowered on every call.
    const stored = (await admin.api.get<{ version: number; default_task_type: string; rules: Array<Record<string, unknown>> }>('/admin/routing')).body;
    const tooHigh = await admin.api.put<ErrorBody>('/admin/routing', {
      version: stored.version,
      default_task_type: stored.default_task_type,
      rules: stored.rules.map((r, i) => (i === 0 ? { ...r, max_tokens: undefined, default_max_tokens: 5000 } : r)),
    });
    expect(tooHigh).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'rules[0].default_max_tokens' } } });
    expect((await admin.api.get<{ version: number }>('/admin/routing')).body.version).toBe(stored.version);

    // A dry run refuses the model ids a real call refuses, with the same code.
    for (const [body, param] of [
      [{ model: 'bad model' }, 'model'],
      [{ models: ['openai/gpt-4\u043e'] }, 'models'],
    ] as const) {
      const dry = await admin.api.post<ErrorBody>('/admin/routing/resolve', body);
      expect(dry, JSON.stringify(body)).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param } } });
    }
  });

  it('lets departments override only rules that allow it, through their own endpoint', async () => {
    const now = await current();
    const rules = now.rules.map((r) => (r.task_type === 'analysis' ? { ...r, department_overridable: true } : { ...r, department_overridable: false }));
    expect((await put({ rules, comment: 'only analysis is overridable' })).status).toBe(200);
    const carol = await gw.tenants.create();
    const path = `/admin/routing/departments/${carol.departmentId}`;

    const version = (await current()).version;
    const refused = await admin.api.put<ErrorBody>(path, {
      version,
      overrides: [
        { task_type: 'code', model: GPT4O },
        { task_type: 'analysis', max_tokens: -1 },
      ],
    });
    expect(refused.status).toBe(400);
    expect(refused.body.error.problems?.map((p) => p.param)).toEqual(['overrides[0].task_type', 'overrides[1].max_tokens']);
    expect((await admin.api.put<ErrorBody>('/admin/routing/departments/00000000-0000-4000-8000-000000000000', { version, overrides: [] })).status).toBe(404);

    const ok = await admin.api.put<Table>(path, {
      version,
      overrides: [{ task_type: 'analysis', model: LLAMA, fallbacks: [] }],
      comment: 'carol: cheap analysis',
    });
    expect(ok.status).toBe(200);
    expect(ok.body).toMatchObject({ version: version + 1, comment: 'carol: cheap analysis', updated_by: admin.userId });
    expect(ok.body.department_overrides).toEqual(
      expect.arrayContaining([{ department_id: carol.departmentId, task_type: 'analysis', model: LLAMA, fallbacks: [] }]),
    );
    expect((await admin.api.put<ErrorBody>(path, { version, overrides: [] })).status).toBe(409);

    const viaCarol = await chat(carol, { task_type: 'analysis' });
    expect(viaCarol.body.model).toBe(LLAMA);
    expect(viaCarol.headers.get('x-gateway-route')).toBe(`task_type=analysis; rule=analysis; version=${version + 1}; override=department`);
    expect((await chat(alice, { task_type: 'analysis' })).body.model).toBe(SONNET);
    expect((await admin.api.get<{ overrides: unknown[] }>(path)).body.overrides).toHaveLength(1);

    // Removing them is a version too.
    const cleared = await admin.api.put<Table>(path, { version: version + 1, overrides: [] });
    expect(cleared.status).toBe(200);
    expect((await chat(carol, { task_type: 'analysis' })).body.model).toBe(SONNET);
  });

  it('documents the routing admin API in /docs', async () => {
    const doc = await gw.admin.get<{ paths: Record<string, Record<string, unknown>> }>('/docs/openapi.json');
    expect(doc.status).toBe(200);
    expect(Object.keys(doc.body.paths)).toEqual(
      expect.arrayContaining([
        '/admin/routing',
        '/admin/routing/versions',
        '/admin/routing/versions/{version}',
        '/admin/routing/rollback/{version}',
        '/admin/routing/resolve',
        '/admin/routing/departments/{id}',
      ]),
    );
    expect(Object.keys(doc.body.paths['/admin/routing'] ?? {})).toEqual(expect.arrayContaining(['get', 'put']));
    expect(JSON.stringify(doc.body)).toContain('department_overridable');
  });
});
