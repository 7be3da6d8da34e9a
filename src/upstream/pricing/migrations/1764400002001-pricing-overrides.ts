import type { MigrationInterface, QueryRunner } from 'typeorm';

export class PricingOverrides1764400002001 implements MigrationInterface {
  name = 'PricingOverrides1764400002001';

  async up(q: QueryRunner): Promise<void> {
    // Prices stay the decimal text an admin (or OpenRouter) wrote: converting to a float would
    // change "0.00000015" and every cost computed from it.
    await q.query(`CREATE TABLE model_price_overrides (
      model text PRIMARY KEY,
      prompt text NOT NULL,
      completion text NOT NULL,
      updated_at timestamptz NOT NULL DEFAULT now(),
      updated_by text NOT NULL
    )`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE model_price_overrides');
  }
}
