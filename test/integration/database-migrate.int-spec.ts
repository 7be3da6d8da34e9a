import { describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { openDatabase, type OpenedDatabase } from '../../src/database/data-source.js';
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
    } finally {
      await Promise.all(opened.map((o) => o.close()));
      await db.drop();
    }
  });
});
