import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import { inject } from 'vitest';
import type { DatabaseConfig } from '../../src/config/config.js';
import type { DatabaseTarget } from '../../src/database/data-source.js';

/** The real PostgreSQL on this machine (CI makes sure it answers). Each test gets its own database. */
export const PG_ADMIN_URL = process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
export const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

export type DbKind = 'pglite' | 'postgres';
export const DB_KINDS: DbKind[] = ['pglite', 'postgres'];

export interface TestDatabase {
  kind: DbKind;
  config: DatabaseConfig;
  target: DatabaseTarget;
  /** Set for postgres: share it to run two gateway instances on one database. */
  url: string | undefined;
  drop(): Promise<void>;
}

export async function createPostgresDatabase(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `gatehouse_t_${process.pid}_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(PG_ADMIN_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    async drop() {
      const client = new pg.Client({ connectionString: PG_ADMIN_URL });
      await client.connect();
      try {
        await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await client.end();
      }
    },
  };
}

let templateBytes: Promise<Buffer> | undefined;

/** A migrated embedded database in memory, loaded from the run's template (no initdb). */
export async function pgliteTarget(): Promise<DatabaseTarget> {
  templateBytes ??= readFile(inject('pgliteTemplatePath'));
  const bytes = await templateBytes;
  return { driver: 'pglite', dataDir: 'memory://', template: new Blob([new Uint8Array(bytes)]) };
}

export async function createTestDatabase(kind: DbKind, sharedPostgresUrl?: string): Promise<TestDatabase> {
  if (kind === 'pglite') {
    return { kind, config: { driver: 'pglite', dataDir: 'memory://' }, target: await pgliteTarget(), url: undefined, drop: () => Promise.resolve() };
  }
  if (sharedPostgresUrl) {
    const config: DatabaseConfig = { driver: 'postgres', url: sharedPostgresUrl };
    return { kind, config, target: config, url: sharedPostgresUrl, drop: () => Promise.resolve() };
  }
  const db = await createPostgresDatabase();
  const config: DatabaseConfig = { driver: 'postgres', url: db.url };
  return { kind, config, target: config, url: db.url, drop: () => db.drop() };
}
