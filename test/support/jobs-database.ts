import { DATABASE_CONTENT } from '../../src/app.module.js';
import { type OpenedDatabase, openDatabase } from '../../src/database/data-source.js';
import type { Principal } from '../../src/identity/principal.js';
import type { NewJob } from '../../src/jobs/job.types.js';
import { createPostgresDatabase, type DbKind, pgliteTarget } from './databases.js';

export interface JobsTestDatabase {
  db: OpenedDatabase;
  /** The owner of the spec's jobs: one department, user and key, named after the spec. */
  principal: Principal;
  close(): Promise<void>;
}

/**
 * What the job specs run against without a gateway: PGlite or a new PostgreSQL database with every
 * migration run, and a principal whose rows exist (jobs reference its key, user and department).
 */
export async function openJobsTestDatabase(kind: DbKind, name: string): Promise<JobsTestDatabase> {
  let db: OpenedDatabase;
  let drop: (() => Promise<void>) | undefined;
  if (kind === 'postgres') {
    const pg = await createPostgresDatabase();
    drop = () => pg.drop();
    db = await openDatabase({ driver: 'postgres', url: pg.url }, DATABASE_CONTENT);
  } else {
    db = await openDatabase(await pgliteTarget(), DATABASE_CONTENT);
  }
  const [dept] = await db.dataSource.query<Array<{ id: string }>>(`INSERT INTO departments (name) VALUES ($1) RETURNING id`, [`${name}-dept`]);
  const [user] = await db.dataSource.query<Array<{ id: string }>>(`INSERT INTO users (name, department_id, role) VALUES ($1, $2, 'user') RETURNING id`, [
    `${name}-user`,
    dept?.id,
  ]);
  const prefix = `gh-${name}`;
  const [key] = await db.dataSource.query<Array<{ id: string }>>(`INSERT INTO api_keys (user_id, prefix, key_hash) VALUES ($1, $2, $3) RETURNING id`, [
    user?.id,
    prefix,
    `hash-${name}`,
  ]);
  if (!dept || !user || !key) throw new Error('test principal not created');
  const principal: Principal = {
    keyId: key.id,
    keyPrefix: prefix,
    userId: user.id,
    departmentId: dept.id,
    role: 'user',
    cacheScope: 'user',
    expiresAt: undefined,
  };
  return {
    db,
    principal,
    close: async () => {
      await db.close();
      await drop?.();
    },
  };
}

/** A chat job of `principal` with the fields the specs do not care about filled in; `overrides` win. */
export function newJobFor(principal: Principal, overrides: Partial<NewJob> = {}): NewJob {
  return {
    principal,
    door: 'chat',
    body: { messages: [{ role: 'user', content: 'hi' }] },
    taskType: undefined,
    cacheControl: { read: true, write: true, ttlSeconds: undefined },
    requestId: 'req-1',
    idempotencyKey: undefined,
    bodyHash: 'hash-a',
    callbackUrl: undefined,
    ...overrides,
  };
}
