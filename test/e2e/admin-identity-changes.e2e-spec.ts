import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashApiKey } from '../../src/identity/api-key.js';
import { IdentityService } from '../../src/identity/identity.service.js';
import { ApiClient, startTestGateway, type TestGateway } from '../support/gateway.js';

// Identity changes by several admins at once, and the last-admin guard's reach.

interface ErrorBody {
  error: { message: string; type: string; code: string; param: string | null };
}

describe('PATCH of a department racing its DELETE (PostgreSQL)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres' });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('a department disabled while a rename is in flight stays disabled, and its keys stay refused', async () => {
    const tenant = await gw.tenants.create();
    expect((await tenant.api.get('/v1/models')).status).toBe(200);

    // Holds the rename after it has read the department (at its name check, before it writes),
    // and lets a second admin's DELETE through meanwhile.
    const identity = gw.gateway.app.get<IdentityService, { assertDepartmentNameFree: (...args: unknown[]) => Promise<void> }>(IdentityService);
    const original = identity.assertDepartmentNameFree.bind(identity);
    let reached!: () => void;
    const atCheck = new Promise<void>((resolve) => (reached = resolve));
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    identity.assertDepartmentNameFree = async (...args) => {
      reached();
      await gate;
      return original(...args);
    };
    try {
      const patch = gw.admin.patch<{ name: string; disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`, { name: 'renamed-research' });
      await atCheck;
      const disabled = await gw.admin.delete<{ disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`);
      expect(disabled.status).toBe(200);
      expect(disabled.body.disabled_at).not.toBeNull();
      release();
      const renamed = await patch;
      expect(renamed.status).toBe(200);
      expect(renamed.body).toMatchObject({ name: 'renamed-research', disabled_at: disabled.body.disabled_at });
    } finally {
      identity.assertDepartmentNameFree = original;
    }

    const after = await gw.admin.get<{ disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`);
    expect(after.body.disabled_at, 'the concurrent PATCH enabled the department again').not.toBeNull();
    expect((await tenant.api.get('/v1/models')).status, "the disabled department's key works again").toBe(401);
  });
});

describe('the last-admin guard, once every admin key expires within 24 h (PGlite)', () => {
  let gw: TestGateway;
  let ops: ApiClient;

  beforeAll(async () => {
    gw = await startTestGateway();
    // An admin with a key valid for 30 h retires the bootstrap key (allowed: its key lasts past 24 h).
    const dept = await gw.admin.post<{ id: string }>('/admin/departments', { name: 'platform' });
    const user = await gw.admin.post<{ id: string }>('/admin/users', { name: 'ops', department_id: dept.body.id, role: 'admin' });
    const key = await gw.admin.post<{ id: string; key: string }>('/admin/keys', {
      user_id: user.body.id,
      expires_at: new Date(Date.now() + 30 * 3600_000).toISOString(),
    });
    expect(key.status).toBe(201);
    ops = new ApiClient(gw.url, key.body.key);
    const ds = gw.gateway.app.get(DataSource);
    const [env] = await ds.query<Array<{ id: string }>>('SELECT id FROM api_keys WHERE key_hash = $1', [hashApiKey(gw.adminKey)]);
    expect((await ops.delete(`/admin/keys/${env.id}`)).status).toBe(200);
    // Ten hours later: the only admin key expires in 20 h, and still works.
    await ds.query(`UPDATE api_keys SET expires_at = now() + interval '20 hours' WHERE id = $1`, [key.body.id]);
    gw.gateway.app.get(IdentityService).forgetCachedKeys();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it("revokes an ordinary user's leaked key (no admin key is touched)", async () => {
    const dept = await ops.post<{ id: string }>('/admin/departments', { name: 'research' });
    const user = await ops.post<{ id: string }>('/admin/users', { name: 'alice', department_id: dept.body.id, role: 'user' });
    const key = await ops.post<{ id: string; key: string }>('/admin/keys', { user_id: user.body.id });
    expect((await new ApiClient(gw.url, key.body.key).get('/v1/models')).status).toBe(200);

    const revoked = await ops.delete<ErrorBody>(`/admin/keys/${key.body.id}`);
    expect(revoked.status, JSON.stringify(revoked.body)).toBe(200);
    expect((await new ApiClient(gw.url, key.body.key).get('/v1/models')).status).toBe(401);
  });

  it('disables a user and a department that hold no admin key', async () => {
    const dept = await ops.post<{ id: string }>('/admin/departments', { name: 'sales' });
    const user = await ops.post<{ id: string }>('/admin/users', { name: 'bob', department_id: dept.body.id, role: 'user' });
    const disabledUser = await ops.delete<ErrorBody>(`/admin/users/${user.body.id}`);
    expect(disabledUser.status, JSON.stringify(disabledUser.body)).toBe(200);
    const disabledDept = await ops.delete<ErrorBody>(`/admin/departments/${dept.body.id}`);
    expect(disabledDept.status, JSON.stringify(disabledDept.body)).toBe(200);
  });

  it('still refuses to revoke the last admin key (409), and it keeps working', async () => {
    const [own] = await gw.gateway.app.get(DataSource).query<Array<{ id: string }>>(`SELECT k.id FROM api_keys k JOIN users u ON u.id = k.user_id WHERE u.name = 'ops'`);
    const refused = await ops.delete<ErrorBody>(`/admin/keys/${own.id}`);
    expect(refused.status).toBe(409);
    expect(refused.body.error.code).toBe('conflict');
    expect((await ops.get('/admin/keys')).status).toBe(200);
  });
});

describe('misspelt query parameters of admin lists (PGlite)', () => {
  let gw: TestGateway;
  let userId: string;
  beforeAll(async () => {
    gw = await startTestGateway();
    userId = (await gw.tenants.create()).userId;
    await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it.each([
    ['/admin/audit?user_id=', 'user_id'],
    ['/admin/audit/verify?since=', 'since'],
    ['/admin/keys?userid=', 'userid'],
    ['/admin/users?department=', 'department'],
    ['/admin/spend?group=', 'group'],
    ['/admin/queue/dead?after=', 'after'],
    ['/admin/routing/versions?page=', 'page'],
    ['/v1/usage?form=', 'form'],
  ])('GET %s… is 400 naming the parameter, not the unfiltered list', async (path, param) => {
    const res = await gw.admin.get<ErrorBody>(`${path}${userId}`);
    expect(res.status, JSON.stringify(res.body).slice(0, 300)).toBe(400);
    expect(res.body.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_value', param });
    expect(res.body.error.message).toContain(`Unknown query parameter '${param}'`);
  });

  it('the parameters each list does take still filter', async () => {
    const keys = await gw.admin.get<{ data: Array<{ user_id: string }> }>(`/admin/keys?user_id=${userId}`);
    expect(keys.status).toBe(200);
    expect(keys.body.data.map((k) => k.user_id)).toEqual([userId]);
    expect((await gw.admin.get(`/admin/audit?actor=${userId}&limit=5`)).status).toBe(200);
    expect((await gw.admin.get('/admin/routing/versions?limit=2')).status).toBe(200);
  });
});

// forgetCachedKeys() runs once a revocation commits, so this instance refuses the key at once. A
// lookup that had read the key as valid before the commit, and came back after, put it back in the
// cache: the instance that answered DELETE 200 kept accepting the key for KEY_CACHE_MS.
type Lookup = (keyHash: string) => Promise<unknown>;

describe('a key revoked while a lookup of it is in flight (PGlite)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    // The most the config allows, so a lookup that re-cached the revoked key would keep it working
    // well past the next request.
    gw = await startTestGateway({ env: { KEY_CACHE_MS: '2000' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('a key revoked here is refused by the next request, even when a lookup of it was in flight', async () => {
    const tenant = await gw.tenants.create();
    const identity = gw.gateway.app.get<IdentityService, { lookup: Lookup }>(IdentityService);
    const original = identity.lookup.bind(identity);
    const target = hashApiKey(tenant.key);
    let readValid!: () => void;
    const read = new Promise<void>((resolve) => (readValid = resolve));
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let held = false;
    // The first lookup of the tenant's key reads the database (key valid), then is slow to come back
    // (a busy event loop, a slow network reply): the revocation commits meanwhile.
    identity.lookup = async (keyHash: string) => {
      const result = await original(keyHash);
      if (keyHash === target && !held) {
        held = true;
        readValid();
        await gate;
      }
      return result;
    };
    try {
      const inFlight = tenant.api.get('/v1/models');
      await read;
      const revoked = await gw.admin.delete(`/admin/keys/${tenant.keyId}`);
      expect(revoked.status).toBe(200);
      release();
      // Admitted before the revocation answered: acceptable either way.
      await inFlight;
    } finally {
      identity.lookup = original;
    }
    // After DELETE answered 200 on this very instance.
    const after = await tenant.api.get('/v1/models');
    expect(after.status, 'the revoked key still works on the instance that revoked it').toBe(401);
  });
});
