import type { PGlite } from '@electric-sql/pglite';
import pg from 'pg';
import { DataSource, type DataSourceOptions, type MixedList, type EntitySchema } from 'typeorm';
import type { DatabaseConfig } from '../config/config.js';

// pg returns int8 as string by default (TypeORM expects that for bigint columns); keep it so on
// both drivers, and let money code turn strings into BigInt explicitly.

export interface DatabaseContent {
  // eslint-disable-next-line @typescript-eslint/no-unsafe-function-type -- TypeORM's own entity list type
  entities: MixedList<Function | string | EntitySchema>;
  // eslint-disable-next-line @typescript-eslint/no-unsafe-function-type -- TypeORM's own migration list type
  migrations: MixedList<Function | string>;
}

/** A TypeORM DataSource plus whatever must be closed after it (the embedded database). */
export interface OpenedDatabase {
  dataSource: DataSource;
  kind: DatabaseConfig['driver'];
  close(): Promise<void>;
}

export type DatabaseTarget = DatabaseConfig | { driver: 'pglite'; dataDir: string; template?: Blob };

export interface OpenDatabaseOptions {
  /**
   * PostgreSQL only: the server's `statement_timeout` on the gateway's own connections (the client
   * gives up 5 s after it). Migrations are never held to it. Tests lower it.
   */
  statementTimeoutMs?: number;
}

/**
 * Opens the database and brings its schema up to date. Migrations only, never `synchronize`:
 * the same SQL runs on PGlite and PostgreSQL, so what a developer sees is what production gets.
 */
export async function openDatabase(
  target: DatabaseTarget,
  content: DatabaseContent,
  poolSize = 10,
  { statementTimeoutMs = 30_000 }: OpenDatabaseOptions = {},
): Promise<OpenedDatabase> {
  const common = {
    type: 'postgres' as const,
    entities: content.entities,
    migrations: content.migrations,
    synchronize: false,
    migrationsRun: false,
    logging: false,
    // gen_random_uuid() is built into PostgreSQL 13+ and PGlite; never CREATE EXTENSION.
    uuidExtension: 'pgcrypto' as const,
    installExtensions: false,
  };
  let pglite: PGlite | undefined;
  let options: DataSourceOptions;
  if (target.driver === 'postgres') {
    // Migrations get connections of their own, without the limits below: a step may rightly run
    // for minutes (CREATE INDEX CONCURRENTLY waits for every older snapshot, an ALTER rewrites a
    // big table), and a cancelled step is retried from scratch on every restart, into the same
    // limit, so the gateway would never start. (test/integration/database-migrate.int-spec.ts)
    // Two connections: the advisory lock's session and the migration runner's.
    const migrator = new DataSource({ ...common, url: target.url, driver: pg, extra: { max: 2, connectionTimeoutMillis: 5000 } });
    try {
      await migrator.initialize();
      await migrate(migrator, target.driver);
    } finally {
      if (migrator.isInitialized) await migrator.destroy();
    }
    // query_timeout is the client's own limit, for a server that stops answering altogether (it
    // cannot enforce its statement_timeout then): the connection is freed a little after it.
    // idle_in_transaction_session_timeout is for the opposite: an instance that stops talking
    // (paused, partitioned) inside a transaction. The server would keep its locks until TCP gave
    // the session up, hours later, and the audit chain head's lock alone stops every instance's
    // audit writes (test/e2e/audit-frozen-instance.e2e-spec.ts). No transaction of ours awaits
    // anything but its own statements: between two of them runs only in-memory work (an audit
    // batch's hashes, milliseconds), so a live instance never idles 10 s in one, and the others'
    // writers get the lock back well within the 30 s statement_timeout they wait under.
    const extra = {
      max: poolSize,
      connectionTimeoutMillis: 5000,
      statement_timeout: statementTimeoutMs,
      query_timeout: statementTimeoutMs + 5000,
      idle_in_transaction_session_timeout: 10_000,
    };
    options = { ...common, url: target.url, driver: pg, extra };
  } else {
    // PGlite's module is imported only for the embedded database, never on PostgreSQL
    // (docs/operations.md "Memory").
    const { createPglitePgDriver, openPglite } = await import('./pglite/index.js');
    pglite = await openPglite({ dataDir: target.dataDir, loadDataDir: 'template' in target ? target.template : undefined });
    options = { ...common, driver: createPglitePgDriver(pglite), database: 'postgres' };
  }
  const dataSource = new DataSource(options);
  try {
    await dataSource.initialize();
    if (target.driver === 'pglite') await migrate(dataSource, target.driver);
  } catch (error) {
    if (dataSource.isInitialized) await dataSource.destroy();
    await pglite?.close();
    throw error;
  }
  return {
    dataSource,
    kind: target.driver,
    async close() {
      if (dataSource.isInitialized) await dataSource.destroy();
      await pglite?.close();
    },
  };
}

// Any constant shared by all instances; two replicas starting together must not both migrate.
const MIGRATION_LOCK = 7_337_001;
const MIGRATION_LOCK_POLL_MS = 250;

async function migrate(dataSource: DataSource, kind: DatabaseConfig['driver']): Promise<void> {
  if (kind === 'pglite') {
    // One process owns an embedded database, and its single session cannot hold a lock while
    // the migration runner asks for the session again.
    await dataSource.runMigrations({ transaction: 'each' });
    return;
  }
  const runner = dataSource.createQueryRunner();
  try {
    // Asked for in turns, not waited for inside one statement: a replica blocked in
    // pg_advisory_lock holds a snapshot all the while, and a migration that builds an index
    // CONCURRENTLY waits for every older snapshot to end, so the two would wait on each other for
    // ever (PostgreSQL cannot see the cycle: it runs through the lock holder's other session).
    // Between tries this session holds nothing. (test/integration/database-migrate.int-spec.ts)
    for (;;) {
      const rows = (await runner.query('SELECT pg_try_advisory_lock($1) AS locked', [MIGRATION_LOCK])) as Array<{ locked: boolean }>;
      if (rows[0]?.locked === true) break;
      await new Promise((resolve) => setTimeout(resolve, MIGRATION_LOCK_POLL_MS));
    }
    await dataSource.runMigrations({ transaction: 'each' });
  } finally {
    await runner.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK]).catch(() => undefined);
    await runner.release();
  }
}
