import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Idempotency keys of sync calls (`idempotency-key` on POST /v1/chat/completions and /v1/complete
 * without `prefer: respond-async`; an async submit's key lives on its job row). One row per user
 * and key: the first call claims it (`running`), and either stores what it answered (`done`) or
 * deletes the row when it failed, so a retry runs again. `updated_at` is the running call's
 * heartbeat: a claim whose heartbeat stopped (its process died) is taken over by the next call.
 *
 * The response is kept as text, not jsonb: jsonb refuses U+0000 (as the `\u0000` escape), which
 * an upstream's JSON may carry, and the body must be replayed byte for byte.
 */
export class Idempotency1764400006000 implements MigrationInterface {
  name = 'Idempotency1764400006000';

  async up(q: QueryRunner): Promise<void> {
    // No foreign key into identity, as for jobs: the row only scopes the key to its user.
    await q.query(`CREATE TABLE idempotency_keys (
      user_id uuid NOT NULL,
      idempotency_key text NOT NULL,
      body_hash text NOT NULL,
      state text NOT NULL CHECK (state IN ('running', 'done')),
      claim_id uuid NOT NULL,
      request_id text NOT NULL,
      created_at timestamptz NOT NULL,
      updated_at timestamptz NOT NULL,
      response_meta text,
      response_body text,
      PRIMARY KEY (user_id, idempotency_key),
      CHECK (state = 'running' OR (response_meta IS NOT NULL AND response_body IS NOT NULL))
    )`);
    // The sweep of expired keys.
    await q.query(`CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE idempotency_keys');
  }
}
