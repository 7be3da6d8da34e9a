import type { MigrationInterface, QueryRunner } from 'typeorm';

export class Jobs1764400005000 implements MigrationInterface {
  name = 'Jobs1764400005000';

  async up(q: QueryRunner): Promise<void> {
    // No foreign keys into identity: a job keeps the ids it was submitted with as attribution,
    // and the processor re-checks the key itself at run time.
    await q.query(`CREATE TABLE jobs (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      user_id uuid NOT NULL,
      department_id uuid NOT NULL,
      key_id uuid NOT NULL,
      status text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'completed', 'failed')),
      door text NOT NULL CHECK (door IN ('chat', 'complete')),
      request_body jsonb NOT NULL,
      task_type text,
      cache_control jsonb NOT NULL,
      request_id text NOT NULL,
      result jsonb,
      error jsonb,
      model text,
      cost_nanos bigint,
      attempts integer NOT NULL DEFAULT 0,
      dead_lettered boolean NOT NULL DEFAULT false,
      idempotency_key text,
      body_hash text NOT NULL,
      callback_url text,
      created_at timestamptz NOT NULL,
      started_at timestamptz,
      completed_at timestamptz,
      updated_at timestamptz NOT NULL
    )`);
    // NULL keys never conflict, so jobs without an idempotency-key are unaffected.
    await q.query(`CREATE UNIQUE INDEX jobs_idempotency_uq ON jobs (user_id, idempotency_key)`);
    // The sweep looks only at unfinished jobs; the dead-letter list only at dead ones.
    await q.query(`CREATE INDEX jobs_unfinished_idx ON jobs (updated_at) WHERE status IN ('queued', 'running')`);
    await q.query(`CREATE INDEX jobs_dead_idx ON jobs (completed_at DESC) WHERE dead_lettered`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE jobs');
  }
}
