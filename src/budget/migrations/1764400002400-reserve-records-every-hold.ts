import type { MigrationInterface, QueryRunner } from 'typeorm';
import { ReserveBatch1764400002200 } from './1764400002200-reserve-batch.js';

/**
 * `gatehouse_reserve_batch` records every admitted hold, also on a scope without a budget, as
 * RESERVE_SQL does: a reservation row carries the worst case on both scopes (`user_nanos`,
 * `department_nanos`), which a budget created while the call is in flight starts holding
 * (BudgetSettingsService), and which the call's settle or the sweeper then takes off it.
 *
 * Why: a row was recorded only on the scopes that had a budget when the call was admitted. A
 * budget created during the call counted nothing for it, admitted more requests on top, and was
 * charged the call's cost when it settled: 2.4× its limit in the reproduction that
 * test/integration/budget-created-in-flight.int-spec.ts now guards.
 *
 * The function now takes its lock on `budget_reservations` before it reads any budget: a budget
 * created meanwhile (whose statement locks that table while it sums the holds) is then either
 * seen by every item of the batch, or counts every row the batch records. Taken at the INSERT,
 * as before, an item could decide on the budgets as they were, and record its row after the new
 * budget had summed the holds without it.
 */
export class ReserveRecordsEveryHold1764400002400 implements MigrationInterface {
  name = 'ReserveRecordsEveryHold1764400002400';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
CREATE OR REPLACE FUNCTION gatehouse_reserve_batch(p_items jsonb, p_now timestamptz, p_day timestamptz, p_week timestamptz, p_month timestamptz)
RETURNS TABLE (r_idx integer, r_ok boolean, r_recorded boolean, r_scope text, r_limit_nanos bigint, r_period text,
               r_period_start timestamptz, r_spent_nanos bigint, r_reserved_nanos bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
  item record;
  v_ok boolean;
BEGIN
  LOCK TABLE budget_reservations IN ROW EXCLUSIVE MODE;
  PERFORM 1 FROM budgets b
   WHERE (b.scope = 'user' AND b.scope_id IN (SELECT (x->>'user_id')::uuid FROM jsonb_array_elements(p_items) x))
      OR (b.scope = 'department' AND b.scope_id IN (SELECT (x->>'department_id')::uuid FROM jsonb_array_elements(p_items) x))
   ORDER BY b.scope, b.scope_id
     FOR UPDATE;
  -- A period that ended starts again from zero (RESERVE_SQL does the same on its rows).
  UPDATE budgets b
     SET spent_nanos = 0,
         period_start = CASE b.period WHEN 'daily' THEN p_day WHEN 'weekly' THEN p_week WHEN 'monthly' THEN p_month ELSE b.period_start END,
         updated_at = p_now
   WHERE ((b.scope = 'user' AND b.scope_id IN (SELECT (x->>'user_id')::uuid FROM jsonb_array_elements(p_items) x))
       OR (b.scope = 'department' AND b.scope_id IN (SELECT (x->>'department_id')::uuid FROM jsonb_array_elements(p_items) x)))
     AND b.period_start < CASE b.period WHEN 'daily' THEN p_day WHEN 'weekly' THEN p_week WHEN 'monthly' THEN p_month ELSE b.period_start END;

  FOR item IN
    SELECT t.ord::integer AS ord, (t.x->>'id')::uuid AS id, t.x->>'request_id' AS request_id,
           (t.x->>'user_id')::uuid AS user_id, (t.x->>'department_id')::uuid AS department_id, (t.x->>'amount')::bigint AS amount
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(x, ord)
     ORDER BY t.ord
  LOOP
    SELECT COALESCE(bool_and(b.spent_nanos + b.reserved_nanos + item.amount <= b.limit_nanos), true)
      INTO v_ok
      FROM budgets b
     WHERE (b.scope = 'user' AND b.scope_id = item.user_id) OR (b.scope = 'department' AND b.scope_id = item.department_id);
    IF v_ok THEN
      UPDATE budgets b SET reserved_nanos = b.reserved_nanos + item.amount, updated_at = p_now
       WHERE (b.scope = 'user' AND b.scope_id = item.user_id) OR (b.scope = 'department' AND b.scope_id = item.department_id);
      r_recorded := item.amount > 0;
      IF r_recorded THEN
        INSERT INTO budget_reservations (id, request_id, user_id, department_id, user_nanos, department_nanos, created_at)
        VALUES (item.id, item.request_id, item.user_id, item.department_id, item.amount, item.amount, p_now);
      END IF;
      r_idx := item.ord;
      r_ok := true;
      RETURN NEXT;
    ELSE
      RETURN QUERY
        SELECT item.ord, false, false, b.scope, b.limit_nanos, b.period, b.period_start, b.spent_nanos, b.reserved_nanos
          FROM budgets b
         WHERE (b.scope = 'user' AND b.scope_id = item.user_id) OR (b.scope = 'department' AND b.scope_id = item.department_id);
    END IF;
  END LOOP;
END
$fn$`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP FUNCTION gatehouse_reserve_batch(jsonb, timestamptz, timestamptz, timestamptz, timestamptz)');
    await new ReserveBatch1764400002200().up(q);
  }
}
