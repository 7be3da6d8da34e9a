import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `gatehouse_reserve_batch`: the reservations of requests that reach the budget stage in the same
 * event-loop turn, decided in ONE statement (one round trip, one commit) instead of one each.
 *
 * Same rules as RESERVE_SQL, item by item in array order: the worst case is added to the user's
 * AND the department's budget only if it fits both (all or nothing), a reservation row is
 * recorded for the sweeper, scopes without a budget are unlimited. An item sees every earlier
 * item's hold, so a batch can never grant more than the budgets can take.
 *
 * Deadlocks: every budget row the batch touches is locked first, in the one global order all
 * budget statements use (`ORDER BY scope, scope_id`), before anything is decided.
 *
 * Output columns are prefixed `r_` so they cannot be confused with the table's columns inside
 * the function body (PL/pgSQL makes OUT parameters variables).
 */
export class ReserveBatch1764400002200 implements MigrationInterface {
  name = 'ReserveBatch1764400002200';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
CREATE FUNCTION gatehouse_reserve_batch(p_items jsonb, p_now timestamptz, p_day timestamptz, p_week timestamptz, p_month timestamptz)
RETURNS TABLE (r_idx integer, r_ok boolean, r_recorded boolean, r_scope text, r_limit_nanos bigint, r_period text,
               r_period_start timestamptz, r_spent_nanos bigint, r_reserved_nanos bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
  item record;
  v_ok boolean;
  v_user boolean;
  v_department boolean;
BEGIN
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
    SELECT COALESCE(bool_and(b.spent_nanos + b.reserved_nanos + item.amount <= b.limit_nanos), true),
           COALESCE(bool_or(b.scope = 'user'), false),
           COALESCE(bool_or(b.scope = 'department'), false)
      INTO v_ok, v_user, v_department
      FROM budgets b
     WHERE (b.scope = 'user' AND b.scope_id = item.user_id) OR (b.scope = 'department' AND b.scope_id = item.department_id);
    IF v_ok THEN
      UPDATE budgets b SET reserved_nanos = b.reserved_nanos + item.amount, updated_at = p_now
       WHERE (b.scope = 'user' AND b.scope_id = item.user_id) OR (b.scope = 'department' AND b.scope_id = item.department_id);
      r_recorded := (v_user OR v_department) AND item.amount > 0;
      IF r_recorded THEN
        INSERT INTO budget_reservations (id, request_id, user_id, department_id, user_nanos, department_nanos, created_at)
        VALUES (item.id, item.request_id, item.user_id, item.department_id,
                CASE WHEN v_user THEN item.amount ELSE 0 END, CASE WHEN v_department THEN item.amount ELSE 0 END, p_now);
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
  }
}
