import type { MigrationInterface, QueryRunner } from 'typeorm';

export class Budget1764400002000 implements MigrationInterface {
  name = 'Budget1764400002000';

  async up(q: QueryRunner): Promise<void> {
    // Money is integer nano-dollars (1e-9 USD) in bigint: exact sums, no float drift.
    // No foreign keys: the hot path should not pay for checks the edge already made, and
    // ledger rows must outlive anything they mention.
    await q.query(`CREATE TABLE budgets (
      scope text NOT NULL CHECK (scope IN ('user', 'department')),
      scope_id uuid NOT NULL,
      limit_nanos bigint NOT NULL CHECK (limit_nanos >= 0),
      period text NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly', 'total')),
      period_start timestamptz NOT NULL,
      spent_nanos bigint NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
      reserved_nanos bigint NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
      created_at timestamptz NOT NULL DEFAULT now(),
      updated_at timestamptz NOT NULL DEFAULT now(),
      PRIMARY KEY (scope, scope_id)
    )`);
    // One row per request in flight that holds money on a budget; deleted by settle, or by the
    // sweeper when its instance died.
    await q.query(`CREATE TABLE budget_reservations (
      id uuid PRIMARY KEY,
      request_id text NOT NULL,
      user_id uuid NOT NULL,
      department_id uuid NOT NULL,
      user_nanos bigint NOT NULL,
      department_nanos bigint NOT NULL,
      created_at timestamptz NOT NULL
    )`);
    await q.query(`CREATE INDEX budget_reservations_created_idx ON budget_reservations (created_at)`);
    // One row per upstream attempt (and per cache hit), append-only.
    await q.query(`CREATE TABLE usage_ledger (
      id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      request_id text NOT NULL,
      attempt smallint NOT NULL,
      key_id text,
      user_id uuid NOT NULL,
      department_id uuid NOT NULL,
      model text NOT NULL,
      prompt_tokens integer NOT NULL DEFAULT 0,
      completion_tokens integer NOT NULL DEFAULT 0,
      cost_nanos bigint NOT NULL CHECK (cost_nanos >= 0),
      cost_source text NOT NULL,
      status integer,
      outcome text NOT NULL,
      cache text,
      task_type text,
      door text NOT NULL,
      created_at timestamptz NOT NULL
    )`);
    await q.query(`CREATE INDEX usage_ledger_user_idx ON usage_ledger (user_id, created_at)`);
    await q.query(`CREATE INDEX usage_ledger_department_idx ON usage_ledger (department_id, created_at)`);
    await q.query(`CREATE INDEX usage_ledger_created_idx ON usage_ledger (created_at)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE usage_ledger');
    await q.query('DROP TABLE budget_reservations');
    await q.query('DROP TABLE budgets');
  }
}
