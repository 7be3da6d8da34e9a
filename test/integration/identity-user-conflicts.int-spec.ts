import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { type DatabaseTarget, openDatabase } from '../../src/database/data-source.js';
import { IDENTITY_MIGRATIONS } from '../../src/identity/identity.module.js';
import { createPostgresDatabase, DB_KINDS, type DbKind } from '../support/databases.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';

// Users and keys that could never work are refused (409), and a user's name is unique in its
// department regardless of case, as a department's name is, enforced by a unique index
// (migration UserNames1764400000200) so that concurrent creates cannot both win.

const conflict = (param: string) => ({ status: 409, body: { error: { type: 'conflict_error', code: 'conflict', param } } });

describe.each(DB_KINDS)('users and keys that cannot work, and duplicate user names, on %s', (db) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
  });
  afterAll(async () => {
    await gw?.close();
  });

  async function department(name: string): Promise<string> {
    const res = await gw.admin.post<{ id: string }>('/admin/departments', { name });
    expect(res.status).toBe(201);
    return res.body.id;
  }

  async function user(name: string, departmentId: string) {
    return gw.admin.post<{ id: string; name: string }>('/admin/users', { name, department_id: departmentId, role: 'user' });
  }

  it('refuses a user in a disabled department, and a key for a disabled user or a user of a disabled department', async () => {
    const closed = await department('Closed');
    const early = await user('early', closed);
    expect(early.status).toBe(201);
    expect((await gw.admin.delete(`/admin/departments/${closed}`)).status).toBe(200);

    expect(await user('late', closed)).toMatchObject(conflict('department_id'));
    expect(await gw.admin.post('/admin/keys', { user_id: early.body.id })).toMatchObject(conflict('user_id'));

    const open = await department('Open');
    const leaver = await user('leaver', open);
    expect((await gw.admin.post('/admin/keys', { user_id: leaver.body.id })).status).toBe(201);
    expect((await gw.admin.delete(`/admin/users/${leaver.body.id}`)).status).toBe(200);
    expect(await gw.admin.post('/admin/keys', { user_id: leaver.body.id })).toMatchObject(conflict('user_id'));

    // Nothing was created by the refusals.
    const users = await gw.admin.get<{ data: Array<{ name: string }> }>(`/admin/users?department_id=${closed}`);
    expect(users.body.data.map((u) => u.name)).toEqual(['early']);
    const keys = await gw.admin.get<{ data: unknown[] }>(`/admin/keys?user_id=${early.body.id}`);
    expect(keys.body.data).toEqual([]);
  });

  it('refuses a second user of the same name in a department, in any case, even when the creates race', async () => {
    const research = await department('Research-names');
    const alice = await user('alice', research);
    expect(alice.status).toBe(201);
    expect(await user('alice', research)).toMatchObject(conflict('name'));
    expect(await user('ALICE', research)).toMatchObject(conflict('name'));
    // Another department may have its own alice.
    expect((await user('Alice', await department('Other-names'))).status).toBe(201);

    // Ten at once: the index lets exactly one through; the others are 409, never a 500.
    const raced = await Promise.all(Array.from({ length: 10 }, (_, i) => user(i % 2 === 0 ? 'bob' : 'Bob', research)));
    expect(raced.map((r) => r.status).sort()).toEqual([201, ...Array<number>(9).fill(409)]);

    // A disabled user's name is free again (a user cannot be re-enabled).
    expect((await gw.admin.delete(`/admin/users/${alice.body.id}`)).status).toBe(200);
    expect((await user('alice', research)).status).toBe(201);

    const names = (await gw.admin.get<{ data: Array<{ name: string }> }>(`/admin/users?department_id=${research}`)).body.data.map((u) => u.name);
    expect(names.filter((n) => n.toLowerCase() === 'bob')).toHaveLength(1);
    expect(names.filter((n) => n === 'alice')).toHaveLength(2);
  });
});

/** An empty database that outlives one open, as a deployment's does. */
async function persistentDatabase(kind: DbKind): Promise<{ target: DatabaseTarget; drop(): Promise<void> }> {
  if (kind === 'postgres') {
    const db = await createPostgresDatabase();
    return { target: { driver: 'postgres', url: db.url }, drop: () => db.drop() };
  }
  const dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-user-names-'));
  return { target: { driver: 'pglite', dataDir }, drop: () => rm(dataDir, { recursive: true, force: true }) };
}

describe.each(DB_KINDS)('upgrading a %s database that holds duplicate user names', (kind) => {
  let database: Awaited<ReturnType<typeof persistentDatabase>>;

  beforeAll(async () => {
    database = await persistentDatabase(kind);
  });
  afterAll(async () => {
    await database?.drop();
  });

  it('migrates: later duplicates are renamed deterministically, and the index then holds', async () => {
    // The schema and rows as the previous release left them.
    const before = await openDatabase(database.target, { entities: [], migrations: IDENTITY_MIGRATIONS.slice(0, 2) }, 2);
    let ids: Record<string, string> = {};
    try {
      const q = before.dataSource;
      const [dept] = await q.query<Array<{ id: string }>>(`INSERT INTO departments (name) VALUES ('Research') RETURNING id`);
      const [other] = await q.query<Array<{ id: string }>>(`INSERT INTO departments (name) VALUES ('Sales') RETURNING id`);
      const add = async (label: string, name: string, departmentId: string, createdAt: string, disabled = false) => {
        const [row] = await q.query<Array<{ id: string }>>(
          `INSERT INTO users (name, department_id, role, created_at, disabled_at) VALUES ($1, $2, 'user', $3, $4) RETURNING id`,
          [name, departmentId, createdAt, disabled ? createdAt : null],
        );
        ids = { ...ids, [label]: row?.id ?? '' };
      };
      await add('first', 'alice', dept?.id ?? '', '2025-01-01T00:00:00Z');
      await add('second', 'ALICE', dept?.id ?? '', '2025-01-02T00:00:00Z');
      // Already called what the second would become.
      await add('taken', 'alice (2)', dept?.id ?? '', '2025-01-03T00:00:00Z');
      await add('third', 'Alice', dept?.id ?? '', '2025-01-04T00:00:00Z');
      await add('disabled', 'alice', dept?.id ?? '', '2024-12-01T00:00:00Z', true);
      await add('elsewhere', 'alice', other?.id ?? '', '2025-01-05T00:00:00Z');
    } finally {
      await before.close();
    }

    // A start of this release runs every pending migration.
    const after = await openDatabase(database.target, DATABASE_CONTENT, 2);
    try {
      const q = after.dataSource;
      const rows = await q.query<Array<{ id: string; name: string }>>(`SELECT id, name FROM users`);
      const nameOf = (label: string) => rows.find((r) => r.id === ids[label])?.name;
      expect(nameOf('first')).toBe('alice');
      // 'alice (2)' is another user's name already, so the second takes the next free suffix…
      expect(nameOf('second')).toBe('ALICE (3)');
      expect(nameOf('taken')).toBe('alice (2)');
      // …and the third the one after (suffixes compare case-insensitively too).
      expect(nameOf('third')).toBe('Alice (4)');
      expect(nameOf('disabled')).toBe('alice');
      expect(nameOf('elsewhere')).toBe('alice');

      // The index now refuses what the admin API answers 409 for.
      const dept = await q.query<Array<{ id: string }>>(`SELECT department_id AS id FROM users WHERE id = $1`, [ids.first]);
      await expect(q.query(`INSERT INTO users (name, department_id, role) VALUES ('aLiCe', $1, 'user')`, [dept[0]?.id])).rejects.toMatchObject({
        code: '23505',
      });
      await q.query(`INSERT INTO users (name, department_id, role) VALUES ('alice (5)', $1, 'user')`, [dept[0]?.id]);
    } finally {
      await after.close();
    }
  });
});
