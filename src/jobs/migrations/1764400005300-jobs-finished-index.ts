import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * The retention sweep (JOBS_RETENTION_HOURS) deletes finished jobs, oldest first, in small
 * batches: without this index every batch would scan the whole table, which holds every job of
 * the retention period. Only the rows the sweep may delete are in it.
 */
export class JobsFinishedIndex1764400005300 implements MigrationInterface {
  name = 'JobsFinishedIndex1764400005300';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`CREATE INDEX jobs_finished_idx ON jobs (completed_at) WHERE status IN ('completed', 'failed') AND NOT dead_lettered`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP INDEX jobs_finished_idx');
  }
}
