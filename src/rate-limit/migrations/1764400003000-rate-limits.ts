import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Admin overrides of the configured rate limits, per key, user or department. No foreign key:
 * the subject lives in one of three tables; the admin service checks it exists.
 */
export class RateLimits1764400003000 implements MigrationInterface {
  name = 'RateLimits1764400003000';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`CREATE TABLE rate_limit_overrides (
      scope text NOT NULL CHECK (scope IN ('key', 'user', 'department')),
      subject_id uuid NOT NULL,
      requests_per_minute integer NOT NULL CHECK (requests_per_minute > 0),
      tokens_per_minute bigint CHECK (tokens_per_minute IS NULL OR tokens_per_minute > 0),
      updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
      updated_by text NOT NULL,
      PRIMARY KEY (scope, subject_id)
    )`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE rate_limit_overrides');
  }
}
