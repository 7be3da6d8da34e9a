import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * When a job was last dead-lettered. `completed_at` says the same while the job is in the
 * dead-letter queue, but an admin retry clears it (the job is queued again), so the job's place
 * in the queue's order would be lost: `GET /admin/queue/dead?before=<id>` names the last job of
 * the previous page, which the admin may have retried or discarded meanwhile, and paging must
 * still continue after it. This column is set when a job is first dead-lettered and never changed (1764400005400).
 * Jobs dead-lettered now get it from `completed_at`; those retried before this migration have
 * no known place (NULL), and a `before` naming one is refused as before.
 */
export class JobsDeadLetteredAt1764400005200 implements MigrationInterface {
  name = 'JobsDeadLetteredAt1764400005200';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE jobs ADD COLUMN dead_lettered_at timestamptz`);
    await q.query(`UPDATE jobs SET dead_lettered_at = completed_at WHERE dead_lettered`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE jobs DROP COLUMN dead_lettered_at');
  }
}
