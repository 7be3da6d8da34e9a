import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuditService } from '../../src/audit/audit.service.js';
import type { DatabaseConfig } from '../../src/config/config.js';
import { loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { openDatabase } from '../../src/database/data-source.js';
import type { DatabaseTarget } from '../../src/database/data-source.js';
import { createGateway, type Gateway } from '../../src/gateway.js';
import { hashApiKey, keyPrefix } from '../../src/identity/api-key.js';
import { IDENTITY_MIGRATIONS } from '../../src/identity/identity.module.js';
import { createPostgresDatabase, DB_KINDS, type DbKind, pgliteTarget } from '../support/databases.js';
import { ApiClient, pollUntil } from '../support/gateway.js';

interface KeyView {
  id: string;
  key?: string;
  prefix: string;
  revoked_at: string | null;
  from_env: boolean;
}

interface AuditRow {
  action: string;
  actor_user_id: string | null;
  actor_key_id: string | null;
  target_type: string | null;
  target_id: string | null;
  details: Record<string, unknown>;
}

// Random from the first character: the prefix (10 characters) must tell these keys apart.
const newAdminKey = () => `${randomBytes(16).toString('hex')}-admin`;

/**
 * One database that outlives gateway instances, as a deployment's does: a PostgreSQL database
 * shared by replicas, or an embedded data directory reopened by each restart.
 */
async function persistentDatabase(kind: DbKind): Promise<{ config: DatabaseConfig; target: () => Promise<DatabaseTarget>; drop(): Promise<void> }> {
  if (kind === 'postgres') {
    const db = await createPostgresDatabase();
    const config: DatabaseConfig = { driver: 'postgres', url: db.url };
    return { config, target: () => Promise.resolve(config), drop: () => db.drop() };
  }
  const dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-rotation-'));
  return {
    config: { driver: 'pglite', dataDir },
    // The template is loaded only into an empty directory: later starts reopen what the first wrote.
    target: async () => {
      const template = await pgliteTarget();
      return { driver: 'pglite', dataDir, template: 'template' in template ? template.template : undefined };
    },
    drop: () => rm(dataDir, { recursive: true, force: true }),
  };
}

interface Instance {
  gateway: Gateway;
  /** Every log line this instance wrote, raw. */
  logs: string[];
  as(key: string): ApiClient;
}

async function startWith(database: { config: DatabaseConfig; target: () => Promise<DatabaseTarget> }, adminKey: string): Promise<Instance> {
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      logs.push(chunk.toString());
      done();
    },
  });
  const env = { PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', ADMIN_API_KEY: adminKey, AUDIT_FLUSH_MS: '20' };
  const gateway = await createGateway(
    { ...loadConfig(env), database: database.config },
    { logger: createLogger('info', sink), databaseTarget: await database.target() },
  );
  return { gateway, logs, as: (key) => new ApiClient(gateway.url, key) };
}

/** An admin key made through the admin API, named like the bootstrap key on purpose: the name must not matter. */
async function createApiAdminKey(admin: ApiClient): Promise<{ id: string; key: string }> {
  const dept = await admin.post<{ id: string }>('/admin/departments', { name: `platform-${randomBytes(3).toString('hex')}` });
  const user = await admin.post<{ id: string }>('/admin/users', { name: 'platform-admin', department_id: dept.body.id, role: 'admin' });
  const key = await admin.post<KeyView>('/admin/keys', { user_id: user.body.id, name: 'bootstrap (ADMIN_API_KEY)' });
  expect(key.status).toBe(201);
  return { id: key.body.id, key: key.body.key ?? '' };
}

async function keyRow(admin: ApiClient, prefix: string): Promise<KeyView> {
  const keys = await admin.get<{ data: KeyView[] }>('/admin/keys');
  const row = keys.body.data.find((k) => k.prefix === prefix);
  if (!row) throw new Error(`no key with prefix ${prefix}`);
  return row;
}

async function rotationEvents(admin: ApiClient): Promise<AuditRow[]> {
  const res = await admin.get<{ data: AuditRow[] }>('/admin/audit?action=bootstrap.revoke_key');
  expect(res.status).toBe(200);
  return res.body.data;
}

describe.each(DB_KINDS)('rotating ADMIN_API_KEY on %s', (db) => {
  const a = newAdminKey();
  const b = newAdminKey();
  const d = newAdminKey();
  let database: Awaited<ReturnType<typeof persistentDatabase>>;
  const running: Instance[] = [];
  let platform: { id: string; key: string };

  /** A new instance on the same database. The embedded database has one owner at a time, so there the previous one stops first. */
  async function start(adminKey: string): Promise<Instance> {
    if (db === 'pglite') while (running.length > 0) await running.pop()?.gateway.close();
    const instance = await startWith(database, adminKey);
    running.push(instance);
    return instance;
  }

  beforeAll(async () => {
    database = await persistentDatabase(db);
  });
  afterAll(async () => {
    for (const instance of running.reverse()) await instance.gateway.close();
    await database?.drop();
  });

  it('a start with a new key revokes the previous one (401) and records that in the audit, never the secret', async () => {
    const first = await start(a);
    expect((await first.as(a).get('/admin/users')).status).toBe(200);
    platform = await createApiAdminKey(first.as(a));

    const second = await start(b);
    expect((await second.as(b).get('/admin/users')).status).toBe(200);
    expect(await second.as(a).get('/admin/users')).toMatchObject({ status: 401, body: { error: { code: 'invalid_api_key' } } });
    // On the instance that was started with it too, once its cached lookup lapses (KEY_CACHE_MS).
    if (db === 'postgres') await pollUntil(async () => expect((await first.as(a).get('/admin/users')).status).toBe(401), 2000);
    expect((await keyRow(second.as(b), keyPrefix(a))).revoked_at).not.toBeNull();

    const revokedId = (await keyRow(second.as(b), keyPrefix(a))).id;
    const events = await pollUntil(async () => {
      const rows = await rotationEvents(second.as(b));
      expect(rows).toHaveLength(1);
      return rows;
    });
    expect(events[0]).toMatchObject({
      action: 'bootstrap.revoke_key',
      actor_user_id: null,
      actor_key_id: null,
      target_type: 'keys',
      target_id: revokedId,
      details: { actor: 'system:bootstrap', reason: 'ADMIN_API_KEY rotated', prefix: keyPrefix(a), replaced_by: { key_prefix: keyPrefix(b) } },
    });
    expect(JSON.stringify(events)).not.toContain(a);
    expect(JSON.stringify(events)).not.toContain(b);
    expect(JSON.stringify(events)).not.toContain(hashApiKey(a));

    const rotated = second.logs.find((line) => line.includes('revoked the key of an earlier ADMIN_API_KEY'));
    expect(rotated).toContain(keyPrefix(a));
    for (const line of [...first.logs, ...second.logs]) {
      expect(line).not.toContain(a);
      expect(line).not.toContain(b);
    }
  });

  it('a replica still started with the previous key (a rolling deploy) revokes nothing, and that key stays revoked', async () => {
    const stale = await start(a);
    expect((await stale.as(b).get('/admin/users')).status).toBe(200);
    expect((await stale.as(a).get('/admin/users')).status).toBe(401);
    expect(stale.logs.some((line) => line.includes('ADMIN_API_KEY names a revoked key'))).toBe(true);
    // The newer instance keeps working with the newer key: no ping-pong between replicas.
    for (const instance of running) expect((await instance.as(b).get('/admin/users')).status).toBe(200);
    // Whatever this start recorded is stored before the count.
    await stale.gateway.app.get(AuditService).flush();
    expect(await rotationEvents(stale.as(b))).toHaveLength(1);
  });

  it('a key created through the admin API survives every rotation, whatever its name', async () => {
    expect((await running[0].as(platform.key).get('/admin/users')).status).toBe(200);
    const third = await start(d);
    expect((await third.as(d).get('/admin/users')).status).toBe(200);
    expect((await third.as(b).get('/admin/users')).status).toBe(401);
    expect((await third.as(platform.key).get('/admin/users')).status).toBe(200);
    expect(await keyRow(third.as(d), keyPrefix(platform.key))).toMatchObject({ revoked_at: null, from_env: false });
    // The listing tells an operator which keys a rotation retires.
    expect(await keyRow(third.as(d), keyPrefix(d))).toMatchObject({ revoked_at: null, from_env: true });
    expect((await keyRow(third.as(d), keyPrefix(b))).from_env).toBe(true);
    await pollUntil(async () => expect(await rotationEvents(third.as(d))).toHaveLength(2));
  });

  it('a start with a key an admin revoked through the API does not bring it back, and says so', async () => {
    const current = running.at(-1)!;
    const own = await keyRow(current.as(platform.key), keyPrefix(d));
    expect((await current.as(platform.key).delete(`/admin/keys/${own.id}`)).status).toBe(200);
    expect((await current.as(d).get('/admin/users')).status).toBe(401);

    const restarted = await start(d);
    expect((await restarted.as(d).get('/admin/users')).status).toBe(401);
    expect((await restarted.as(platform.key).get('/admin/users')).status).toBe(200);
    expect((await keyRow(restarted.as(platform.key), keyPrefix(d))).revoked_at).not.toBeNull();
    const warning = restarted.logs.find((line) => line.includes('ADMIN_API_KEY names a revoked key'));
    expect(warning).toContain('"level":"warn"');
    expect(warning).not.toContain(d);
    await restarted.gateway.app.get(AuditService).flush();
    expect(await rotationEvents(restarted.as(platform.key))).toHaveLength(2);
  });
});

describe('upgrading a PostgreSQL database whose ADMIN_API_KEY row predates the from_env flag', () => {
  let database: Awaited<ReturnType<typeof persistentDatabase>>;
  let instance: Instance | undefined;

  beforeAll(async () => {
    database = await persistentDatabase('postgres');
  });
  afterAll(async () => {
    await instance?.gateway.close();
    await database?.drop();
  });

  it('treats the old bootstrap row as provisioned from ADMIN_API_KEY, and an API key of the same name as not', async () => {
    const old = newAdminKey();
    const lookalike = `gh-${randomBytes(32).toString('base64url')}`;
    // The schema and rows as the previous release left them: identity's first migration only.
    const before = await openDatabase(await database.target(), { entities: [], migrations: [IDENTITY_MIGRATIONS[0]] });
    try {
      const q = before.dataSource;
      const [dept] = await q.query<Array<{ id: string }>>(`INSERT INTO departments (name) VALUES ('gatehouse-admins') RETURNING id`);
      const [user] = await q.query<Array<{ id: string }>>(
        `INSERT INTO users (name, department_id, role) VALUES ('bootstrap-admin', $1, 'admin') RETURNING id`,
        [dept.id],
      );
      await q.query(`INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES ($1, 'bootstrap (ADMIN_API_KEY)', $2, $3)`, [
        user.id,
        keyPrefix(old),
        hashApiKey(old),
      ]);
      const [other] = await q.query<Array<{ id: string }>>(`INSERT INTO departments (name) VALUES ('platform') RETURNING id`);
      const [admin] = await q.query<Array<{ id: string }>>(`INSERT INTO users (name, department_id, role) VALUES ('ops', $1, 'admin') RETURNING id`, [
        other.id,
      ]);
      await q.query(`INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES ($1, 'bootstrap (ADMIN_API_KEY)', $2, $3)`, [
        admin.id,
        keyPrefix(lookalike),
        hashApiKey(lookalike),
      ]);
    } finally {
      await before.close();
    }

    const rotated = newAdminKey();
    instance = await startWith(database, rotated);
    expect((await instance.as(rotated).get('/admin/users')).status).toBe(200);
    expect((await instance.as(old).get('/admin/users')).status).toBe(401);
    expect((await instance.as(lookalike).get('/admin/users')).status).toBe(200);
  });
});
