import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Cache hits are counted into the ledger instead of written one row each: a row with
 * `cache_hits = N` stands for N hits of one key, model, task type and door within one second
 * (BudgetWriter.recordCacheHit). A hit costs nothing, so the row carries no money, only what the
 * usage reports count: requests and tokens. Rows of charged calls leave it NULL; so do the
 * one-per-hit rows written before this migration, which the reports still count one by one.
 *
 * Why: a hit's own row was 7-9% of the CPU the gateway spends on a hit at 16 connections
 * (BENCHMARKS.md, session 15), and most of the ledger's growth when the cache works.
 * Each hit keeps its own row in the audit trail, with its request id.
 */
export class LedgerCacheHits1764400002300 implements MigrationInterface {
  name = 'LedgerCacheHits1764400002300';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE usage_ledger ADD COLUMN cache_hits integer CHECK (cache_hits > 0)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE usage_ledger DROP COLUMN cache_hits');
  }
}
