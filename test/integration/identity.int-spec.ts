import { DataSource } from 'typeorm';
import { IdentityService } from '../../src/identity/identity.service.js';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, startTestGateway, type TestGateway } from '../support/gateway.js';
import type { TcpProxy } from '../support/redis.js';

interface KeyView {
  id: string;
  key?: string;
  prefix: string;
  user_id: string;
  revoked_at: string | null;
  key_hash?: string;
}

describe.each(DB_KINDS)('identity on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw.close();
  });

  it('creates departments, users and keys; the key is shown once and stored only as a hash', async () => {
    const dept = await gw.admin.post<{ id: string; name: string }>('/admin/departments', { name: 'Research' });
    expect(dept.status).toBe(201);
    expect(dept.body).toMatchObject({ name: 'Research', id: expect.stringMatching(/^[0-9a-f-]{36}$/) });

    const user = await gw.admin.post<{ id: string }>('/admin/users', { name: 'alice', department_id: dept.body.id, role: 'user' });
    expect(user).toMatchObject({ status: 201, body: { name: 'alice', department_id: dept.body.id, role: 'user' } });

    const key = await gw.admin.post<KeyView>('/admin/keys', { user_id: user.body.id, name: 'laptop' });
    expect(key.status).toBe(201);
    expect(key.body.key).toMatch(/^gh-/);
    expect(key.body.key?.startsWith(key.body.prefix)).toBe(true);

    const listed = await gw.admin.get<{ data: KeyView[] }>(`/admin/keys?user_id=${user.body.id}`);
    expect(listed.body.data).toHaveLength(1);
    expect(listed.body.data[0]).not.toHaveProperty('key');
    expect(listed.body.data[0]).not.toHaveProperty('key_hash');

    // What the database holds is a sha256, never the key.
    const rows = await gw.gateway.app.get(DataSource).query<Array<{ key_hash: string }>>('SELECT key_hash FROM api_keys WHERE id = $1', [key.body.id]);
    expect(rows[0]?.key_hash).toMatch(/^[0-9a-f]{64}$/);
    expect(rows[0]?.key_hash).not.toContain(key.body.key);

    const me = await fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${key.body.key}` } });
    expect(me.status).toBe(200);
  });

  it('rejects duplicates, unknown references and bad input with the field named', async () => {
    await gw.admin.post('/admin/departments', { name: 'Sales' });
    const dup = await gw.admin.post('/admin/departments', { name: 'sales' });
    expect(dup).toMatchObject({ status: 409, body: { error: { type: 'conflict_error', code: 'conflict', param: 'name' } } });

    const noDept = await gw.admin.post('/admin/users', { name: 'x', department_id: '00000000-0000-4000-8000-000000000000', role: 'user' });
    expect(noDept).toMatchObject({ status: 404, body: { error: { code: 'not_found', param: 'department_id' } } });

    const badRole = await gw.admin.post('/admin/users', { name: 'x', department_id: '00000000-0000-4000-8000-000000000000', role: 'root' });
    expect(badRole).toMatchObject({ status: 400, body: { error: { param: 'role' } } });

    const missing = await gw.admin.post('/admin/keys', {});
    expect(missing).toMatchObject({ status: 400, body: { error: { code: 'missing_field', param: 'user_id' } } });

    const unknownKey = await gw.admin.delete('/admin/keys/not-a-uuid');
    expect(unknownKey).toMatchObject({ status: 404, body: { error: { type: 'not_found_error' } } });
  });

  it('refuses a rename onto another department’s name (409) and a NUL in any name (400), never a 500', async () => {
    await gw.admin.post('/admin/departments', { name: 'Alpha' });
    const beta = await gw.admin.post<{ id: string }>('/admin/departments', { name: 'Beta' });
    const clash = await gw.admin.patch(`/admin/departments/${beta.body.id}`, { name: 'alpha' });
    expect(clash).toMatchObject({ status: 409, body: { error: { type: 'conflict_error', code: 'conflict', param: 'name' } } });
    // Its own name in another case is no clash.
    expect((await gw.admin.patch(`/admin/departments/${beta.body.id}`, { name: 'BETA' })).status).toBe(200);

    const nul = { status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value', param: 'name' } } };
    expect(await gw.admin.post('/admin/departments', { name: 'a\u0000b' })).toMatchObject(nul);
    expect(await gw.admin.patch(`/admin/departments/${beta.body.id}`, { name: 'b\u0000' })).toMatchObject(nul);
    expect(await gw.admin.post('/admin/users', { name: 'x\u0000y', department_id: beta.body.id, role: 'user' })).toMatchObject(nul);
  });

  it('answers a malformed id in a list filter with a 400 naming the parameter, and an unknown one with an empty list', async () => {
    expect(await gw.admin.get('/admin/users?department_id=nope')).toMatchObject({
      status: 400,
      body: { error: { code: 'invalid_value', param: 'department_id' } },
    });
    expect(await gw.admin.get('/admin/keys?user_id=nope')).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'user_id' } } });
    expect(await gw.admin.get('/admin/keys?user_id=00000000-0000-4000-8000-000000000000')).toMatchObject({ status: 200, body: { data: [] } });
  });

  it('revoking a key, disabling a user or a department locks their keys out at once on this instance', async () => {
    const a = await gw.tenants.create();
    const b = await gw.tenants.create();
    const c = await gw.tenants.create();
    for (const t of [a, b, c]) expect((await t.api.get('/v1/models')).status).toBe(200);

    expect((await gw.admin.delete(`/admin/keys/${a.keyId}`)).status).toBe(200);
    expect((await gw.admin.delete(`/admin/users/${b.userId}`)).status).toBe(200);
    expect((await gw.admin.delete(`/admin/departments/${c.departmentId}`)).status).toBe(200);
    for (const t of [a, b, c]) {
      const res = await t.api.get('/v1/models');
      expect(res).toMatchObject({ status: 401, body: { error: { code: 'invalid_api_key' } } });
    }
  });

  it('honours key expiry', async () => {
    const t = await gw.tenants.create();
    const past = await gw.admin.post('/admin/keys', { user_id: t.userId, expires_at: '2001-01-01T00:00:00Z' });
    expect(past).toMatchObject({ status: 400, body: { error: { param: 'expires_at' } } });
    const soon = await gw.admin.post<KeyView>('/admin/keys', { user_id: t.userId, expires_at: new Date(Date.now() + 60_000).toISOString() });
    expect(soon.status).toBe(201);
    const res = await fetch(`${gw.url}/v1/models`, { headers: { 'x-api-key': soon.body.key ?? '' } });
    expect(res.status).toBe(200);
  });

  it('an admin user created through the API can use /admin; a user cannot', async () => {
    const admin = await gw.tenants.create({ role: 'admin' });
    expect((await admin.api.get('/admin/users')).status).toBe(200);
    const user = await gw.tenants.create();
    expect((await user.api.get('/admin/users')).status).toBe(403);
  });
});

describe.each(DB_KINDS)('the last usable admin key on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('cannot be revoked, nor its user or department disabled, until another admin key exists', async () => {
    // A fresh gateway's only admin key is ADMIN_API_KEY's, owned by the bootstrap admin.
    const users = await gw.admin.get<{ data: Array<{ id: string; name: string; department_id: string }> }>('/admin/users');
    const bootstrap = users.body.data.find((u) => u.name === 'bootstrap-admin');
    expect(bootstrap).toBeDefined();
    const keys = await gw.admin.get<{ data: KeyView[] }>(`/admin/keys?user_id=${bootstrap?.id}`);
    const adminKeyId = keys.body.data.find((k) => k.revoked_at === null)?.id;
    const lockout = { status: 409, body: { error: { code: 'conflict' } } };
    expect(await gw.admin.delete(`/admin/keys/${adminKeyId}`)).toMatchObject(lockout);
    expect(await gw.admin.delete(`/admin/users/${bootstrap?.id}`)).toMatchObject(lockout);
    expect(await gw.admin.delete(`/admin/departments/${bootstrap?.department_id}`)).toMatchObject(lockout);
    expect((await gw.admin.get('/admin/users')).status).toBe(200);

    // With a second admin in another department, the bootstrap one may go.
    const other = await gw.tenants.create({ role: 'admin' });
    expect((await gw.admin.delete(`/admin/departments/${bootstrap?.department_id}`)).status).toBe(200);
    expect((await other.api.get('/admin/users')).status).toBe(200);
    // And that second admin is now the last one.
    expect(await other.api.delete(`/admin/keys/${other.keyId}`)).toMatchObject(lockout);
  });
});

describe('the key cache under a flood of unknown keys (PostgreSQL)', () => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres' });
  });
  afterAll(async () => {
    await gw?.close();
  });

  // Before, a full cache was cleared: distinct bad keys wiped every valid key's entry with it.
  it('keeps a valid key cached however many distinct bad keys are tried, and stays bounded', async () => {
    const alice = await gw.tenants.create();
    const dataSource = gw.gateway.app.get(DataSource);
    const identity = Object.assign(new IdentityService(dataSource, gw.config, new ManualClock(Date.now())), { maxCachedKeys: 4 });
    const queries = vi.spyOn(dataSource, 'query');
    await identity.authenticate(alice.key);
    const afterFirst = queries.mock.calls.length;
    expect(afterFirst).toBe(1);
    for (let i = 0; i < 3; i++) await expect(identity.authenticate(`gh-not-a-key-${i}`)).rejects.toMatchObject({ code: 'invalid_api_key' });
    // Still cached: no lookup.
    await identity.authenticate(alice.key);
    expect(queries.mock.calls.length).toBe(afterFirst + 3);
    // Ten more push out only bad keys: the valid one is still answered from memory…
    for (let i = 3; i < 13; i++) await expect(identity.authenticate(`gh-not-a-key-${i}`)).rejects.toMatchObject({ code: 'invalid_api_key' });
    await identity.authenticate(alice.key);
    expect(queries.mock.calls.length).toBe(afterFirst + 13);
    // …and the bad ones are bounded: the last four are remembered, the first was dropped.
    await expect(identity.authenticate('gh-not-a-key-12')).rejects.toMatchObject({ code: 'invalid_api_key' });
    expect(queries.mock.calls.length).toBe(afterFirst + 13);
    await expect(identity.authenticate('gh-not-a-key-0')).rejects.toMatchObject({ code: 'invalid_api_key' });
    expect(queries.mock.calls.length).toBe(afterFirst + 14);
    queries.mockRestore();
  });
});

// Before, the check "another admin key remains" and the change were separate statements: two
// admins revoking each other's keys at once both passed it, and nobody could reach /admin.
describe.each(DB_KINDS)('the last two admin keys, taken away at the same moment, on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw?.close();
  });

  async function usableAdminKeys(): Promise<number> {
    const [row] = await gw.gateway.app
      .get(DataSource)
      .query<Array<{ n: number | string }>>(
        `SELECT count(*) AS n FROM api_keys k JOIN users u ON u.id = k.user_id JOIN departments d ON d.id = u.department_id
          WHERE u.role = 'admin' AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND d.disabled_at IS NULL`,
      );
    return Number(row?.n);
  }

  it('lets exactly one of two crossed revocations, user disables or department disables through, the other is 409', async () => {
    const identity = gw.gateway.app.get(IdentityService);
    let made = 0;
    const newAdmin = async () => {
      made += 1;
      const department = await identity.createDepartment(`admins-${made}`);
      const user = await identity.createUser({ name: `admin-${made}`, departmentId: department.id, role: 'admin' });
      const { entity } = await identity.createKey({ userId: user.id });
      return { keyId: entity.id, userId: user.id, departmentId: department.id };
    };
    // The bootstrap admin goes first, so that each round starts with exactly two admins.
    let survivor = await newAdmin();
    const [bootstrap] = await gw.gateway.app.get(DataSource).query<Array<{ id: string }>>(`SELECT id FROM users WHERE name = 'bootstrap-admin'`);
    await identity.disableUser(bootstrap?.id ?? '');
    expect(await usableAdminKeys()).toBe(1);
    type Admin = typeof survivor;
    const changes = [
      (a: Admin, b: Admin) => [identity.revokeKey(a.keyId), identity.revokeKey(b.keyId)],
      (a: Admin, b: Admin) => [identity.disableUser(a.userId), identity.disableUser(b.userId)],
      (a: Admin, b: Admin) => [identity.disableDepartment(a.departmentId), identity.disableDepartment(b.departmentId)],
    ];
    for (const change of changes) {
      for (let round = 0; round < 5; round++) {
        const other = await newAdmin();
        expect(await usableAdminKeys()).toBe(2);
        const results = await Promise.allSettled(change(survivor, other));
        expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
        expect(results.find((r) => r.status === 'rejected')).toMatchObject({ reason: { code: 'conflict', status: 409 } });
        expect(await usableAdminKeys()).toBe(1);
        survivor = results[0]?.status === 'fulfilled' ? other : survivor;
      }
    }
  });
});

describe.each(DB_KINDS)('an admin key about to expire, as the last one on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw?.close();
  });

  // Before, a key expiring in seconds counted as "another admin key": the ADMIN_API_KEY could be
  // revoked, and the admin API was lost when the short-lived key expired.
  it('does not let the lasting admin key go; one usable for more than 24 hours does', async () => {
    const users = await gw.admin.get<{ data: Array<{ id: string; name: string }> }>('/admin/users');
    const bootstrap = users.body.data.find((u) => u.name === 'bootstrap-admin');
    const keys = await gw.admin.get<{ data: KeyView[] }>(`/admin/keys?user_id=${bootstrap?.id}`);
    const envKeyId = keys.body.data.find((k) => k.revoked_at === null)?.id;
    const admin = await gw.tenants.create({ role: 'admin' });
    // The tenant's own key (no expiry) goes first, leaving the admin user with short-lived keys only.
    const hourLater = new Date(Date.now() + 3600_000).toISOString();
    const shortLived = await gw.admin.post<{ id: string; key: string }>('/admin/keys', { user_id: admin.userId, expires_at: hourLater });
    expect(shortLived.status).toBe(201);
    expect((await gw.admin.delete(`/admin/keys/${admin.keyId}`)).status).toBe(200);
    const refused = await gw.admin.delete(`/admin/keys/${envKeyId}`);
    expect(refused).toMatchObject({ status: 409, body: { error: { code: 'conflict' } } });
    expect((refused.body as { error: { message: string } }).error.message).toContain('24 hours');

    const twoDaysLater = new Date(Date.now() + 2 * 86400_000).toISOString();
    expect((await gw.admin.post('/admin/keys', { user_id: admin.userId, expires_at: twoDaysLater })).status).toBe(201);
    expect((await gw.admin.delete(`/admin/keys/${envKeyId}`)).status).toBe(200);
  });
});

describe('the admin API while PostgreSQL is away', () => {
  let gateways: ProxiedGateway;
  let proxy: TcpProxy;
  let gw: TestGateway;

  beforeAll(async () => {
    // The admin key stays cached while the database is gone: the call itself meets the outage.
    gateways = await startGatewayBehindPostgresProxy({ env: { DATABASE_REQUEST_TIMEOUT_MS: '500', KEY_CACHE_MS: '2000' } });
    ({ proxy, gw } = gateways);
  });
  afterAll(async () => {
    await gateways?.close();
  });

  it('answers 503 unavailable, not a 500, and serves again once the database is back', async () => {
    expect((await gw.admin.get('/admin/departments')).status).toBe(200);
    await proxy.stop();
    try {
      const away = await gw.admin.post('/admin/departments', { name: 'while-away' });
      expect(away).toMatchObject({ status: 503, body: { error: { code: 'unavailable' } } });
    } finally {
      await proxy.start();
    }
    await pollUntil(async () => expect((await gw.admin.post('/admin/departments', { name: 'after-the-outage' })).status).toBe(201), 15_000);
  });
});
