import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * The retention sweep (JOBS_RETENTION_HOURS) deletes finished jobs, oldest first, in small
 * batches: without this index every batch would scan the whole table, which holds every job of
 * the retention period. Only the rows the sweep may delete are in it.
 *
 * Built CONCURRENTLY, outside a transaction: the table it indexes may hold every job since the
 * gateway started (nothing was deleted before this release), and a plain CREATE INDEX would block
 * every submit and try of the instances still serving during a rolling upgrade for as long as the
 * build takes.
 */
export class JobsFinishedIndex1764400005300 implements MigrationInterface {
  name = 'JobsFinishedIndex1764400005300';
  transaction = false;

  async up(q: QueryRunner): Promise<void> {
    // A concurrent build cut short (the process killed mid-way) leaves an invalid index of this
    // name behind, which IF NOT EXISTS would keep: drop it and build again.
    const invalid = (await q.query(`SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_finished_idx' AND NOT i.indisvalid`)) as unknown[];
    if (invalid.length > 0) await q.query('DROP INDEX CONCURRENTLY jobs_finished_idx');
    await q.query(`CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_finished_idx ON jobs (completed_at) WHERE status IN ('completed', 'failed') AND NOT dead_lettered`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP INDEX CONCURRENTLY IF EXISTS jobs_finished_idx');
  }
}
