import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { type DatabaseContent, openDatabase, type OpenedDatabase } from '../../src/database/data-source.js';
import { JobsFinishedIndex1764400005300 } from '../../src/jobs/migrations/1764400005300-jobs-finished-index.js';
import { createPostgresDatabase } from '../support/databases.js';

/**
 * Replicas of a rollout start together against one PostgreSQL database: one migrates while the
 * others wait for its advisory lock, then find nothing left to do. A migration that builds an
 * index CONCURRENTLY waits for every transaction older than it, so the waiting replicas must not
 * sit inside one while they wait (a blocking pg_advisory_lock would: neither side would ever move).
 */
describe('migrations on PostgreSQL, replicas starting together', () => {
  it('brings up three replicas on an empty database, each migration run once', { timeout: 120_000 }, async () => {
    const db = await createPostgresDatabase();
    const opened: OpenedDatabase[] = [];
    try {
      const replicas = await Promise.all([0, 1, 2].map(() => openDatabase({ driver: 'postgres', url: db.url }, DATABASE_CONTENT, 2)));
      opened.push(...replicas);
      const runs = await replicas[0].dataSource.query<Array<{ name: string; runs: string }>>('SELECT name, count(*)::text AS runs FROM migrations GROUP BY name');
      const migrations = DATABASE_CONTENT.migrations as unknown[];
      expect(runs).toHaveLength(migrations.length);
      expect(runs.filter((r) => r.runs !== '1')).toEqual([]);
      const index = await replicas[1].dataSource.query<Array<{ valid: boolean }>>(
        `SELECT i.indisvalid AS valid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_finished_idx'`,
      );
      expect(index).toEqual([{ valid: true }]);
      // The dead-letter list's index replaced the one ordered by completed_at.
      const dead = await replicas[2].dataSource.query<Array<{ name: string; valid: boolean }>>(
        `SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname IN ('jobs_dead_idx', 'jobs_dead_list_idx')`,
      );
      expect(dead).toEqual([{ name: 'jobs_dead_list_idx', valid: true }]);
    } finally {
      await Promise.all(opened.map((o) => o.close()));
      await db.drop();
    }
  });
});

/**
 * The gateway's connections cancel any statement after 30 s, but a migration step may rightly take
 * longer: JobsFinishedIndex builds its index CONCURRENTLY, which waits for every transaction
 * holding an older snapshot (a pg_dump, a long report) and may index a table of every job ever.
 * Cancelled, it would start over at every restart, into the same limit, and the gateway would
 * never start. Here the limit is 1 s and the step needs about 2.5 s.
 */
describe('migrations on PostgreSQL, a step longer than the statement timeout', () => {
  it("completes, while the gateway's own connections keep the timeout", { timeout: 60_000 }, async () => {
    const db = await createPostgresDatabase();
    const statementTimeoutMs = 1000;
    // The database as the previous release left it: everything but the concurrent index.
    const previous: DatabaseContent = {
      entities: DATABASE_CONTENT.entities,
      migrations: (DATABASE_CONTENT.migrations as unknown[]).filter((m) => m !== JobsFinishedIndex1764400005300) as DatabaseContent['migrations'],
    };
    await (await openDatabase({ driver: 'postgres', url: db.url }, previous, 2)).close();
    const reader = new pg.Client({ connectionString: db.url });
    let opened: OpenedDatabase | undefined;
    try {
      await reader.connect();
      await reader.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await reader.query('SELECT count(*) FROM jobs');
      const readerDone = new Promise((resolve) => setTimeout(resolve, 2500)).then(() => reader.query('COMMIT'));
      const started = performance.now();
      opened = await openDatabase({ driver: 'postgres', url: db.url }, DATABASE_CONTENT, 2, { statementTimeoutMs }).finally(() => readerDone);
      expect(performance.now() - started).toBeGreaterThan(2 * statementTimeoutMs);
      const index = await opened.dataSource.query<Array<{ valid: boolean }>>(
        `SELECT i.indisvalid AS valid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_finished_idx'`,
      );
      expect(index).toEqual([{ valid: true }]);
      await expect(opened.dataSource.query('SELECT pg_sleep(2)')).rejects.toThrow(/statement timeout/);
    } finally {
      await opened?.close();
      await reader.end();
      await db.drop();
    }
  });
});
