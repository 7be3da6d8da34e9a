import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { PGlite } from '@electric-sql/pglite';
import { DataSource, EntitySchema, QueryFailedError, type MigrationInterface, type QueryRunner } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { closePglite, createPglitePgDriver, dumpPgliteTemplate, openPglite } from '../../src/database/pglite/index.js';

// TypeORM's postgres driver on PGlite through createPglitePgDriver: one initdb for the file,
// a migration like the real ones, then the concurrency and type guarantees the gateway needs.

interface Item {
  id: string;
  label: string;
  createdAt: Date;
}

interface Sample {
  id: string;
  big: string;
  amount: string;
  at: Date;
  doc: Record<string, unknown>;
}

const ItemSchema = new EntitySchema<Item>({
  name: 'Item',
  tableName: 'items',
  columns: {
    id: { type: 'uuid', primary: true, generated: 'uuid' },
    label: { type: 'text' },
    createdAt: { type: 'timestamptz', name: 'created_at', createDate: true },
  },
});

const SampleSchema = new EntitySchema<Sample>({
  name: 'Sample',
  tableName: 'samples',
  columns: {
    id: { type: 'uuid', primary: true, generated: 'uuid' },
    big: { type: 'bigint' },
    amount: { type: 'numeric', precision: 20, scale: 6 },
    at: { type: 'timestamptz' },
    doc: { type: 'jsonb' },
  },
});

class CreateTables1700000000000 implements MigrationInterface {
  name = 'CreateTables1700000000000';
  async up(runner: QueryRunner): Promise<void> {
    // Several statements in one call, as hand-written migrations often do.
    await runner.query(`
      CREATE TABLE items (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        label text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      );
      CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);
      INSERT INTO counters (id, n) VALUES (1, 0);
      CREATE TABLE budgets (id int PRIMARY KEY, spent bigint NOT NULL DEFAULT 0, "limit" bigint NOT NULL);
      CREATE TABLE samples (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        big bigint NOT NULL,
        amount numeric(20, 6) NOT NULL,
        at timestamptz NOT NULL,
        doc jsonb NOT NULL
      );
    `);
  }
  async down(runner: QueryRunner): Promise<void> {
    await runner.query('DROP TABLE samples; DROP TABLE budgets; DROP TABLE counters; DROP TABLE items');
  }
}

function dataSourceOn(db: PGlite): DataSource {
  return new DataSource({
    type: 'postgres',
    driver: createPglitePgDriver(db),
    database: 'postgres',
    entities: [ItemSchema, SampleSchema],
    migrations: [CreateTables1700000000000],
    // gen_random_uuid() is built into Postgres 13+; no extension to install on either backend.
    uuidExtension: 'pgcrypto',
    installExtensions: false,
    synchronize: false,
    logging: false,
  });
}

let db: PGlite;
let ds: DataSource;
let template: Blob;

beforeAll(async () => {
  db = await openPglite({ dataDir: 'memory://' });
  ds = dataSourceOn(db);
  await ds.initialize();
  await ds.runMigrations({ transaction: 'each' });
  template = await dumpPgliteTemplate(db);
});

afterAll(async () => {
  if (ds?.isInitialized) await ds.destroy();
  if (db) await closePglite(db);
});

describe('TypeORM on PGlite', () => {
  it('runs 50 concurrent transactions without losing a row or an increment', async () => {
    const txids = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        ds.transaction(async (manager) => {
          const [{ txid: before }] = await manager.query<[{ txid: string }]>('SELECT txid_current()::text AS txid');
          await manager.insert(ItemSchema, { label: `concurrent-${i}` });
          // Give the other 49 a chance to run in between: they must wait for the session instead.
          await new Promise((resolve) => setTimeout(resolve, i % 3));
          await manager.query('UPDATE counters SET n = n + 1 WHERE id = 1');
          const [{ txid: after }] = await manager.query<[{ txid: string }]>('SELECT txid_current()::text AS txid');
          expect(after).toBe(before);
          return before;
        }),
      ),
    );
    // Interleaved on one session, they would all have shared a single transaction.
    expect(new Set(txids).size).toBe(50);
    const [{ count }] = await ds.query<[{ count: number }]>(`SELECT count(*)::int AS count FROM items WHERE label LIKE 'concurrent-%'`);
    expect(count).toBe(50);
    const [{ n }] = await ds.query<[{ n: number }]>('SELECT n FROM counters WHERE id = 1');
    expect(n).toBe(50);
  });

  it('lets concurrent failing transactions roll back only their own writes', async () => {
    await ds.query('UPDATE counters SET n = 0 WHERE id = 1');
    const results = await Promise.allSettled(
      Array.from({ length: 50 }, (_, i) =>
        ds.transaction(async (manager) => {
          await manager.insert(ItemSchema, { label: `mixed-${i}` });
          await new Promise((resolve) => setTimeout(resolve, i % 3));
          await manager.query('UPDATE counters SET n = n + 1 WHERE id = 1');
          if (i % 5 === 4) await manager.query('SELECT 1/0'); // 10 of them fail after writing
        }),
      ),
    );
    expect(results.filter((result) => result.status === 'rejected')).toHaveLength(10);
    const labels = (await ds.query<{ label: string }[]>(`SELECT label FROM items WHERE label LIKE 'mixed-%'`)).map((row) => row.label);
    expect(labels).toHaveLength(40);
    expect(labels.filter((label) => Number(label.slice('mixed-'.length)) % 5 === 4)).toEqual([]);
    const [{ n }] = await ds.query<[{ n: number }]>('SELECT n FROM counters WHERE id = 1');
    expect(n).toBe(40);
  });

  it('rolls back a transaction that fails midway; the next one works and the process lives', async () => {
    const failure = await ds
      .transaction(async (manager) => {
        await manager.insert(ItemSchema, { label: 'doomed' });
        await manager.query('SELECT 1/0');
      })
      .catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(QueryFailedError);
    expect(failure).toMatchObject({ code: '22012' });

    // A query runner released mid-transaction without a rollback must not leak into the next one.
    const runner = ds.createQueryRunner();
    await runner.startTransaction();
    await runner.manager.insert(ItemSchema, { label: 'abandoned' });
    await expect(runner.query('SELECT * FROM missing_table')).rejects.toBeInstanceOf(QueryFailedError);
    await runner.release();

    await ds.transaction(async (manager) => {
      await manager.insert(ItemSchema, { label: 'after-failure' });
    });
    const labels = (await ds.query<{ label: string }[]>(`SELECT label FROM items WHERE label IN ('doomed', 'abandoned', 'after-failure')`)).map(
      (row) => row.label,
    );
    expect(labels).toEqual(['after-failure']);
  });

  it('lets a conditional UPDATE reserve a budget exactly as often as the limit allows', async () => {
    await ds.query('INSERT INTO budgets (id, spent, "limit") VALUES (1, 0, 230)');
    const outcomes = await Promise.all(
      Array.from({ length: 50 }, () =>
        ds.transaction(async (manager) => {
          // TypeORM returns [rows, affectedCount] for UPDATE on the postgres driver (pg and PGlite alike).
          const [rows] = await manager.query<[{ spent: string }[], number]>(
            'UPDATE budgets SET spent = spent + $1 WHERE id = 1 AND spent + $1 <= "limit" RETURNING spent',
            ['10'],
          );
          return rows.length === 1;
        }),
      ),
    );
    expect(outcomes.filter(Boolean)).toHaveLength(23);
    const [{ spent }] = await ds.query<[{ spent: string }]>('SELECT spent FROM budgets WHERE id = 1');
    expect(spent).toBe('230');
  });

  it('round-trips bigint, numeric, timestamptz, jsonb and generated uuids like pg', async () => {
    const big = (2n ** 60n + 7n).toString(); // > 2^53: must stay exact
    const at = new Date('2031-02-03T04:05:06.789Z');
    const doc = { model: 'gpt', tokens: [1, 2, 3], nested: { ok: true, none: null } };
    const saved = await ds.getRepository(SampleSchema).save({ big, amount: '12345678901234.123456', at, doc });
    expect(saved.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);

    const loaded = await ds.getRepository(SampleSchema).findOneByOrFail({ id: saved.id });
    expect(loaded.big).toBe(big);
    expect(typeof loaded.big).toBe('string');
    expect(loaded.amount).toBe('12345678901234.123456');
    expect(loaded.at).toBeInstanceOf(Date);
    expect(loaded.at.toISOString()).toBe(at.toISOString());
    expect(loaded.doc).toEqual(doc);

    const item = await ds.getRepository(ItemSchema).save({ label: 'uuid-default' });
    expect(item.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(item.createdAt).toBeInstanceOf(Date);

    const [raw] = await ds.query<[{ next: string; n: string }]>('SELECT $1::bigint + 1 AS next, count(*) AS n FROM samples', [big]);
    expect(raw).toEqual({ next: (BigInt(big) + 1n).toString(), n: '1' });
  });

  it('keeps data in a persistent directory across close and reopen', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gatehouse-pglite-'));
    const dataDir = join(dir, 'nested', 'db'); // parents are created as needed
    try {
      const first = await openPglite({ dataDir, loadDataDir: template });
      // A second open of the same directory would corrupt it; it is refused while the first lives.
      await expect(openPglite({ dataDir })).rejects.toThrow(/already open/);
      const firstDs = dataSourceOn(first);
      await firstDs.initialize();
      await firstDs.getRepository(ItemSchema).save({ label: 'persisted' });
      await firstDs.destroy();
      await first.close();

      // The template is ignored now that the directory holds a database.
      const second = await openPglite({ dataDir, loadDataDir: template });
      const secondDs = dataSourceOn(second);
      await secondDs.initialize();
      const rows = await secondDs.getRepository(ItemSchema).findBy({ label: 'persisted' });
      expect(rows).toHaveLength(1);
      // Migrations done before the dump are recorded too: nothing left to run.
      expect(await secondDs.showMigrations()).toBe(false);
      await secondDs.destroy();
      await closePglite(second);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('loads a dumped template into memory:// with the tables created before the dump', async () => {
    await ds.query('CREATE TABLE before_dump (id int PRIMARY KEY, note text)');
    await ds.query(`INSERT INTO before_dump VALUES (1, 'kept')`);
    const fresh = await dumpPgliteTemplate(db, { compression: 'gzip' });
    const copy = await openPglite({ dataDir: 'memory://', loadDataDir: fresh });
    try {
      const copyDs = dataSourceOn(copy);
      await copyDs.initialize();
      expect(await copyDs.query('SELECT note FROM before_dump')).toEqual([{ note: 'kept' }]);
      // The copy is independent of the original.
      await copyDs.query(`INSERT INTO before_dump VALUES (2, 'copy only')`);
      expect(await ds.query('SELECT count(*)::int AS n FROM before_dump')).toEqual([{ n: 1 }]);
      await copyDs.destroy();
    } finally {
      await closePglite(copy);
    }
  });
});
