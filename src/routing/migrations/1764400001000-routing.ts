import type { MigrationInterface, QueryRunner } from 'typeorm';

export class Routing1764400001000 implements MigrationInterface {
  name = 'Routing1764400001000';

  async up(q: QueryRunner): Promise<void> {
    // Append-only: a change or a rollback is a new row, so history is never rewritten.
    await q.query(`CREATE TABLE routing_versions (
      version integer PRIMARY KEY,
      body jsonb NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now(),
      created_by text NOT NULL,
      comment text
    )`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE routing_versions');
  }
}
