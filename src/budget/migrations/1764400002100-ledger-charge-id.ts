import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Makes the batched ledger write idempotent: a flush that failed may still have committed, so
 * its retry inserts with `ON CONFLICT (charge_id, attempt) DO NOTHING` and charges only the rows
 * it actually inserted.
 *
 * The key is a charge id (the reservation id of a settle, a fresh id per cache hit), not
 * `request_id`: request ids come from the caller's `x-request-id` and from job tries
 * (`job-{id}-{try}`, which an admin retry of a dead job starts again at 1), so two distinct
 * charges can share one. Keyed on it, the second would be skipped and its call never paid for;
 * and existing ledgers already hold such duplicates, so a unique index on it could not be built.
 * Rows written before this migration have no charge id (NULLs never conflict).
 */
export class LedgerChargeId1764400002100 implements MigrationInterface {
  name = 'LedgerChargeId1764400002100';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE usage_ledger ADD COLUMN charge_id uuid`);
    await q.query(`CREATE UNIQUE INDEX usage_ledger_charge_uidx ON usage_ledger (charge_id, attempt)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP INDEX usage_ledger_charge_uidx');
    await q.query('ALTER TABLE usage_ledger DROP COLUMN charge_id');
  }
}
