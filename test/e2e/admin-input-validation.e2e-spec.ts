import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Admin (and /v1/usage) input that used to reach SQL or arithmetic unchecked: versions past
// PostgreSQL's integer, money with huge exponents, dates Date.parse takes but PostgreSQL does
// not, misspelt parameters and fields that were silently ignored. Each answers a 4xx naming
// the parameter, never a 500, a stall or a silent no-op.

interface ErrorBody {
  error: { message: string; type: string; code: string; param: string | null };
}
interface Table {
  version: number;
  default_task_type: string;
  rules: unknown[];
  allowed_models?: string[] | null;
  department_overrides?: unknown[];
}

const MISSING_UUID = '00000000-0000-4000-8000-00000000abcd';

describe('admin input validation (PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  const expectError = (res: { status: number; body: unknown }, status: number, code: string, param: string | null) => {
    expect(res.status, JSON.stringify(res.body)).toBe(status);
    expect((res.body as ErrorBody).error).toMatchObject({ code, param });
  };
  /** The raw response text: to see how numbers are written, not what they parse to. */
  const rawText = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(`${gw.url}${path}`, {
      method,
      headers: { authorization: `Bearer ${gw.adminKey}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, text: await res.text() };
  };
  const table = async () => (await gw.admin.get<Table>('/admin/routing')).body;
  const writable = (t: Table) => ({ default_task_type: t.default_task_type, rules: t.rules, allowed_models: t.allowed_models ?? null });

  describe('routing versions past the integer column', () => {
    it('a change based on one is stale (409), like any unknown version', async () => {
      const now = await table();
      for (const version of [10_000_000_000, 2_147_483_647, 3_000_000_000]) {
        const res = await gw.admin.put<ErrorBody & { error: { current_version: number } }>('/admin/routing', { ...writable(now), version });
        expectError(res, 409, 'conflict', 'version');
        expect(res.body.error.current_version).toBe(now.version);
      }
      expectError(await gw.admin.post('/admin/routing/rollback/1', { version: 3_000_000_000 }), 409, 'conflict', 'version');
      expectError(await gw.admin.post('/admin/routing/rollback/999999', { version: 3_000_000_000 }), 404, 'not_found', null);
      const department = alice.departmentId;
      expectError(await gw.admin.put(`/admin/routing/departments/${department}`, { version: 3_000_000_000, overrides: [] }), 409, 'conflict', 'version');
      expectError(await gw.admin.put(`/admin/routing/departments/${MISSING_UUID}`, { version: 3_000_000_000, overrides: [] }), 404, 'not_found', null);
      expect((await table()).version).toBe(now.version);
    });

    it('resolving one finds no such version (404); paging before one is a 400', async () => {
      expectError(await gw.admin.post('/admin/routing/resolve', { version: 3_000_000_000 }), 404, 'not_found', null);
      expectError(await gw.admin.post('/admin/routing/resolve', { version: 1e20 }), 404, 'not_found', null);
      for (const before of ['3000000000', '1e3', '0x10'])
        expectError(await gw.admin.get(`/admin/routing/versions?before=${before}`), 400, 'invalid_value', 'before');
      expect((await gw.admin.get<{ data: unknown[] }>('/admin/routing/versions?before=2147483647')).status).toBe(200);
    });

    it("a department's overrides: 404 for an unknown department, as on PUT", async () => {
      expectError(await gw.admin.get(`/admin/routing/departments/${MISSING_UUID}`), 404, 'not_found', null);
      const known = await gw.admin.get<{ department_id: string; overrides: unknown[] }>(`/admin/routing/departments/${alice.departmentId}`);
      expect(known).toMatchObject({ status: 200, body: { department_id: alice.departmentId, overrides: [] } });
    });

    it('a rollback with content-type application/json and an empty body is a rollback without a body', async () => {
      const before = await table();
      const res = await gw.admin.request<Table & { restored_from: number }>('POST', '/admin/routing/rollback/1', '', { 'content-type': 'application/json' });
      expect(res.status, JSON.stringify(res.body)).toBe(201);
      expect(res.body).toMatchObject({ version: before.version + 1, restored_from: 1 });
      // Only that route: elsewhere an empty JSON body is still refused.
      expect((await gw.admin.request('POST', '/admin/routing/resolve', '', { 'content-type': 'application/json' })).status).toBe(400);
    });
  });

  describe('money with huge exponents', () => {
    it('is refused at once (400), for budgets and prices', async () => {
      for (const limit of ['1e999999999', '1e100000000', '-1e999999999', '1e-999999999999']) {
        const started = performance.now();
        const res = await gw.admin.put(`/admin/budgets/users/${alice.userId}`, { limit_usd: limit, period: 'daily' });
        // The last rounds to 0 nano-dollars: a positive amount below one is refused, not made a $0 budget.
        expectError(res, 400, 'invalid_value', 'limit_usd');
        expect(performance.now() - started).toBeLessThan(2000);
      }
      for (const price of ['1e999999999', '1e100000000', '1e-999999999', '1001', 1e300]) {
        const started = performance.now();
        expectError(await gw.admin.put('/admin/pricing/openai/gpt-4o-mini', { prompt: price, completion: '0.0000006' }), 400, 'invalid_value', 'prompt');
        expect(performance.now() - started).toBeLessThan(2000);
      }
      expect((await gw.admin.put('/admin/pricing/vendor/dear-model', { prompt: '1e3', completion: '0.0000006' })).body).toMatchObject({ prompt: '1000' });
    });
  });

  describe('dates', () => {
    it.each([
      '10000-01-01',
      '%2B275760-09-13T00:00:00Z',
      '-271821-04-20T00:00:00Z',
      '0000-01-01',
      '1',
      '2026-01-01T00:00:00',
      'December%2031%202030',
      '2026-02-30',
    ])('from=%s is a 400 naming the parameter, on every report', async (value) => {
      expectError(await gw.admin.get(`/admin/spend?from=${value}`), 400, 'invalid_value', 'from');
      expectError(await gw.admin.get(`/admin/spend?to=${value}`), 400, 'invalid_value', 'to');
      expectError(await gw.admin.get(`/admin/audit?from=${value}`), 400, 'invalid_value', 'from');
      // (verify also takes a seq: digits alone are one.)
      if (!/^\d+$/.test(value)) expectError(await gw.admin.get(`/admin/audit/verify?to=${value}`), 400, 'invalid_value', 'to');
      expectError(await alice.api.get(`/v1/usage?from=${value}`), 400, 'invalid_value', 'from');
    });

    it('a key expiry must be a strict ISO-8601 date-time', async () => {
      for (const expires of ['December 31 2030', '2030-12-31T00:00:00', '10000-01-01', '2030-02-30T00:00:00Z']) {
        expectError(await gw.admin.post('/admin/keys', { user_id: alice.userId, expires_at: expires }), 400, 'invalid_value', 'expires_at');
      }
      const ok = await gw.admin.post<{ expires_at: string }>('/admin/keys', { user_id: alice.userId, expires_at: '2030-12-31T09:00:00+02:00' });
      expect(ok).toMatchObject({ status: 201, body: { expires_at: '2030-12-31T07:00:00.000Z' } });
    });
  });

  describe('DELETE /admin/cache', () => {
    it('refuses an unknown parameter instead of deleting everything', async () => {
      expectError(await gw.admin.delete(`/admin/cache?userid=${alice.userId}`), 400, 'invalid_value', 'userid');
      expectError(await gw.admin.delete(`/admin/cache?model=openai/gpt-4o-mini&dept=x`), 400, 'invalid_value', 'dept');
      expect(await gw.admin.delete(`/admin/cache?user_id=${alice.userId}`)).toMatchObject({ status: 200, body: { user_id: alice.userId } });
    });
  });

  describe('unknown body fields', () => {
    it('are refused, naming the field, and change nothing', async () => {
      const path = `/admin/rate-limits/users/${alice.userId}`;
      expect((await gw.admin.put(path, { requests_per_minute: 100, tokens_per_minute: 40_000 })).status).toBe(200);
      expectError(await gw.admin.put(path, { requests_per_minute: 200, tokens_per_min: 50_000 }), 400, 'invalid_value', 'tokens_per_min');
      expect((await gw.admin.get(path)).body).toMatchObject({ requests_per_minute: 100, tokens_per_minute: 40_000 });

      const department = `/admin/departments/${alice.departmentId}`;
      expectError(await gw.admin.patch(department, { cachescope: 'department' }), 400, 'invalid_value', 'cachescope');
      expect((await gw.admin.get(department)).body).toMatchObject({ cache_scope: 'user' });

      expectError(await gw.admin.put(`/admin/budgets/users/${alice.userId}`, { limit_usd: 5, period: 'daily', perod: 'total' }), 400, 'invalid_value', 'perod');
      expectError(
        await gw.admin.put('/admin/pricing/openai/gpt-4o-mini', { prompt: '0.1', completion: '0.1', currency: 'EUR' }),
        400,
        'invalid_value',
        'currency',
      );
      expectError(await gw.admin.post('/admin/departments', { name: 'x', cache_scope: 'department' }), 400, 'invalid_value', 'cache_scope');
      expectError(await gw.admin.post('/admin/users', { name: 'x', department_id: alice.departmentId, roles: 'admin' }), 400, 'invalid_value', 'roles');
      expectError(await gw.admin.post('/admin/keys', { user_id: alice.userId, expires: '2030-01-01' }), 400, 'invalid_value', 'expires');
    });
  });

  describe('spend windows given only their end', () => {
    it('start where the period containing the end starts', async () => {
      const report = await gw.admin.get<{ from: string; to: string }>('/admin/spend?to=2026-11-15T00:00:00Z');
      expect(report).toMatchObject({ status: 200, body: { from: '2026-11-01T00:00:00.000Z', to: '2026-11-15T00:00:00.000Z' } });
      // `to` is exclusive: a window ending at a month's first instant is the month before.
      expect((await gw.admin.get('/admin/spend?to=2026-11-01')).body).toMatchObject({ from: '2026-10-01T00:00:00.000Z' });

      const bob = await gw.tenants.create({ userBudgetUsd: 5, period: 'weekly' });
      // Sunday 2026-11-15: its week began on Monday 2026-11-09.
      expect((await bob.api.get('/v1/usage?to=2026-11-15T12:00:00Z')).body).toMatchObject({ from: '2026-11-09T00:00:00.000Z' });
      const carol = await gw.tenants.create();
      expect((await carol.api.get('/v1/usage?to=2026-11-15T12:00:00Z')).body).toMatchObject({ from: '2026-11-01T00:00:00.000Z' });
    });
  });

  describe('budget amounts as JSON numbers', () => {
    it('are capped where they still read back exactly, and written as plain decimals', async () => {
      const path = `/admin/budgets/users/${alice.userId}`;
      const tooBig = await gw.admin.put<ErrorBody>(path, { limit_usd: '123456789.123456789', period: 'daily' });
      expectError(tooBig, 400, 'invalid_value', 'limit_usd');
      expect(tooBig.body.error.message).toContain('8000000');

      const big = await rawText('PUT', path, { limit_usd: '7999999.123456789', period: 'daily' });
      expect(big.status).toBe(200);
      expect(big.text).toContain('"limit_usd":7999999.123456789');

      // Half a nano-dollar rounds to one; below that is refused (it would be a $0 budget), and 0 is 0.
      expectError(await gw.admin.put<ErrorBody>(path, { limit_usd: '0.0000000004', period: 'daily' }), 400, 'invalid_value', 'limit_usd');
      expectError(await gw.admin.put<ErrorBody>(path, { limit_usd: 1e-10, period: 'daily' }), 400, 'invalid_value', 'limit_usd');
      expect((await gw.admin.put(path, { limit_usd: '0.000', period: 'daily' })).status).toBe(200);
      const tiny = await rawText('PUT', path, { limit_usd: '0.000000001', period: 'daily' });
      expect(tiny.text).toContain('"limit_usd":0.000000001,');
      expect(tiny.text).toContain('"remaining_usd":0.000000001,');
      expect((await rawText('GET', path)).text).toContain('"limit_usd":0.000000001,');
      const usage = await fetch(`${gw.url}/v1/usage`, { headers: { authorization: `Bearer ${alice.key}` } });
      const usageText = await usage.text();
      expect(usageText).toContain('"limit_usd":0.000000001,');
      // A JSON number in exponent form (1e-9); not the ids in the body, whose hex may read '9e-4'.
      expect(usageText).not.toMatch(/[:,[]-?\d+(\.\d+)?[eE][-+]?\d/);
    });
  });
});
