import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * When the queue confirmed a job. Until then its submit may still be refused and its record
 * removed, so a repeat of that submit (same idempotency-key) must not be told the job exists.
 * Jobs already here were all accepted (a refused submit removed its record), hence the backfill.
 */
export class JobsEnqueued1764400005100 implements MigrationInterface {
  name = 'JobsEnqueued1764400005100';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE jobs ADD COLUMN enqueued_at timestamptz`);
    await q.query(`UPDATE jobs SET enqueued_at = created_at`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE jobs DROP COLUMN enqueued_at');
  }
}
