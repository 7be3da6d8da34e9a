import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `GET /admin/queue/dead` orders and pages by `dead_lettered_at` (a job keeps its first place in
 * the dead-letter list, JobsRepository.listDead; `completed_at` for a job dead-lettered by an
 * instance older than 1764400005200, which left it NULL), which `jobs_dead_idx (completed_at)`
 * cannot serve: every page would sort the whole dead-letter queue. The expression is the
 * repository's DEAD_PLACE, word for word, or the planner would not use it. This index serves the list, its
 * `before` cursor and the queue's dead count; the old one then only costs writes.
 *
 * CONCURRENTLY, outside a transaction, as jobs_finished_idx: instances still serving during a
 * rolling upgrade keep submitting and finishing jobs while it is built.
 */
export class JobsDeadListIndex1764400005400 implements MigrationInterface {
  name = 'JobsDeadListIndex1764400005400';
  transaction = false;

  async up(q: QueryRunner): Promise<void> {
    // A concurrent build cut short leaves an invalid index behind, which IF NOT EXISTS would keep.
    const invalid = (await q.query(`SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'jobs_dead_list_idx' AND NOT i.indisvalid`)) as unknown[];
    if (invalid.length > 0) await q.query('DROP INDEX CONCURRENTLY jobs_dead_list_idx');
    await q.query(`CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_dead_list_idx ON jobs ((COALESCE(dead_lettered_at, completed_at)) DESC, id DESC) WHERE dead_lettered`);
    await q.query('DROP INDEX CONCURRENTLY IF EXISTS jobs_dead_idx');
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_dead_idx ON jobs (completed_at DESC) WHERE dead_lettered`);
    await q.query('DROP INDEX CONCURRENTLY IF EXISTS jobs_dead_list_idx');
  }
}
