import type { MigrationInterface, QueryRunner } from 'typeorm';

/** Issue #4: each version records what it replaced, and a rollback which version it restored. */
export class RoutingHistory1764400001100 implements MigrationInterface {
  name = 'RoutingHistory1764400001100';

  async up(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE routing_versions ADD COLUMN based_on integer, ADD COLUMN restored_from integer');
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE routing_versions DROP COLUMN restored_from, DROP COLUMN based_on');
  }
}
