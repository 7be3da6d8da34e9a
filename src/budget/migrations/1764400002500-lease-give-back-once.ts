import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `given_back` marks a lease row whose unused headroom was given back (FLUSH_SQL's `$7`: a lease
 * retired while draws are in flight shrinks to what they may still need). A lease is retired
 * once, so its row shrinks for that reason once; the flag is set by the statement that shrinks it
 * and keeps a retried flush from shrinking it again.
 *
 * Why: a flush that committed and whose answer was lost (the connection dropped after COMMIT) is
 * retried, as it must be. The ledger rows and the releases in it were already idempotent, the
 * give-back was not: the retry took it off the lease row and off `reserved` a second time, so the
 * worst case of a stream still running was no longer held and the department admitted a request
 * its limit could not cover (test/integration/budget-leases.int-spec.ts). A constant default adds
 * the column without rewriting the table.
 */
export class LeaseGiveBackOnce1764400002500 implements MigrationInterface {
  name = 'LeaseGiveBackOnce1764400002500';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE budget_reservations ADD COLUMN given_back boolean NOT NULL DEFAULT false`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE budget_reservations DROP COLUMN given_back');
  }
}
