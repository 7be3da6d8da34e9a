/**
 * The budget's statements. Each is ONE statement (one round trip, its own implicit transaction)
 * on PostgreSQL and PGlite alike. Only RESERVE_SQL runs on the request path; FLUSH_SQL stores the
 * settles and cache-hit ledger rows of many requests at once, off it (see budget-writer.ts).
 *
 * Concurrency: every statement that changes budgets first locks the rows it touches with
 * `SELECT … ORDER BY scope, scope_id FOR UPDATE` ('department' sorts before 'user'), so all of
 * them take locks in one global order and cannot deadlock each other. Under READ COMMITTED a
 * locked row is re-read at its newest committed version, so the check `spent + reserved + est
 * <= limit` is made on the numbers no other request can change until this statement commits:
 * there is no read-then-write window.
 *
 * Time: "now" and the current day / week / month starts are parameters computed from the
 * injected Clock (see periods.ts), never `now()`, so tests can move time and both databases
 * apply the same calendar.
 */

/** CASE choosing the current period start for a budget row; $day/$week/$month are parameter refs. */
const currentStart = (day: string, week: string, month: string) =>
  `CASE period WHEN 'daily' THEN ${day}::timestamptz WHEN 'weekly' THEN ${week}::timestamptz WHEN 'monthly' THEN ${month}::timestamptz ELSE period_start END`;

/**
 * Reserve: rolls each budget over if its period ended, then adds the worst case to `reserved`
 * on the user's AND the department's budget only if it fits both (all or nothing), and records
 * the reservation for the sweeper. Scopes without a budget row are unlimited. Returns one row per
 * budget (or one row with null scope when there is none), each with the verdict `ok`.
 *
 * The row is recorded, holding the worst case on both scopes, also where a scope has no budget:
 * a budget created while the call is in flight starts by holding it (BudgetSettingsService sums
 * the rows of its scope), so the call's settle cannot charge it for a call it never counted. A
 * statement takes its table locks before it reads, so a budget being created (which locks
 * `budget_reservations` while it sums them) is either seen here or counts this row.
 *
 * The same rule is written a second time, item by item, in `gatehouse_reserve_batch` (migrations
 * ReserveBatch1764400002200, ReserveRecordsEveryHold1764400002400), which serves turns with
 * several reservations: a change to the rule must be made in both
 * (test/integration/budget.int-spec.ts exercises both paths). The single statement stays
 * because it is what one connection sends: sending a batch of one through the function cost
 * +0.05–0.07 ms per reservation on this machine (pgbench, one client, `synchronous_commit=off`:
 * 0.18 vs 0.23–0.25 ms), on the latency that one connection adds.
 *
 * $1 user_id, $2 department_id, $3 amount, $4 now, $5 day start, $6 week start, $7 month start,
 * $8 reservation id, $9 request id.
 */
export const RESERVE_SQL = `
WITH locked AS MATERIALIZED (
  SELECT scope, scope_id, limit_nanos, period, period_start, spent_nanos, reserved_nanos,
         ${currentStart('$5', '$6', '$7')} AS current_start
    FROM budgets
   WHERE (scope = 'user' AND scope_id = $1::uuid) OR (scope = 'department' AND scope_id = $2::uuid)
   ORDER BY scope, scope_id
     FOR UPDATE
), state AS MATERIALIZED (
  SELECT scope, scope_id, limit_nanos, period, reserved_nanos,
         GREATEST(period_start, current_start) AS period_start,
         CASE WHEN period_start < current_start THEN 0::bigint ELSE spent_nanos END AS spent_nanos
    FROM locked
), verdict AS MATERIALIZED (
  SELECT COALESCE(bool_and(spent_nanos + reserved_nanos + $3::bigint <= limit_nanos), true) AS ok
    FROM state
), held AS (
  UPDATE budgets b
     SET period_start = s.period_start,
         spent_nanos = s.spent_nanos,
         reserved_nanos = b.reserved_nanos + $3::bigint,
         updated_at = $4::timestamptz
    FROM state s, verdict v
   WHERE v.ok AND b.scope = s.scope AND b.scope_id = s.scope_id
  RETURNING b.scope
), recorded AS (
  INSERT INTO budget_reservations (id, request_id, user_id, department_id, user_nanos, department_nanos, created_at)
  SELECT $8::uuid, $9, $1::uuid, $2::uuid, $3::bigint, $3::bigint, $4::timestamptz
    FROM verdict v
   WHERE v.ok AND $3::bigint > 0
  RETURNING id
)
SELECT v.ok, s.scope, s.limit_nanos, s.period, s.period_start, s.spent_nanos, s.reserved_nanos,
       (SELECT count(*) FROM held) AS held, (SELECT count(*) FROM recorded) AS recorded
  FROM verdict v LEFT JOIN state s ON true`;

/**
 * Reserve for several requests at once (those that reached the budget stage in the same
 * event-loop turn): one round trip through `gatehouse_reserve_batch` (migration
 * ReserveRecordsEveryHold1764400002400), which applies RESERVE_SQL's rules item by item in
 * array order.
 * An admitted item yields one row (`ok`, `recorded`); a refused one a row per budget of its
 * scopes, as RESERVE_SQL returns them, for the refusal message.
 *
 * $1 items (jsonb array of {id, request_id, user_id, department_id, amount}), $2 now, $3 day,
 * $4 week, $5 month.
 */
export const RESERVE_BATCH_SQL = `
SELECT r_idx AS idx, r_ok AS ok, CASE WHEN r_recorded THEN 1 ELSE 0 END AS recorded, r_scope AS scope, r_limit_nanos AS limit_nanos,
       r_period AS period, r_period_start AS period_start, r_spent_nanos AS spent_nanos, r_reserved_nanos AS reserved_nanos
  FROM gatehouse_reserve_batch($1::jsonb, $2::timestamptz, $3::timestamptz, $4::timestamptz, $5::timestamptz)`;

/**
 * Flush: stores a batch of settles and cache-hit ledger rows, one statement for the whole batch.
 * It deletes the batch's reservations, takes back what they held, adds the summed cost of the
 * ledger rows to `spent` per budget (rolling a period over if it ended meanwhile), and inserts
 * all ledger rows.
 *
 * - `spent == Σ ledger` by construction: the cost added is summed from the rows this statement
 *   actually inserted (RETURNING), and only from rows dated inside the budget's current period
 *   (a settle queued before midnight and written after it belongs to yesterday, which no longer
 *   counts).
 * - Idempotent: a retried batch (its first attempt may have committed before the error reached
 *   us) inserts nothing twice (`ON CONFLICT (charge_id, attempt) DO NOTHING`) and so charges
 *   nothing twice; its reservations are gone, so nothing is taken back twice either.
 * - A reservation the sweeper released first is not released again: the DELETE finds no row and
 *   only the cost is added.
 * - A draw on a lease (budget-leases.ts) names its lease (`lease_id`): the cost it adds to
 *   `spent` is taken off what the lease row holds (and off `reserved`), so the database never
 *   counts a finished draw twice, as spent and as held. A lease retired while draws are still
 *   in flight gives back what they cannot need the same way ($7), without charging it, once: the
 *   row's `given_back` flag, set by the statement that shrinks it, keeps a retried batch from
 *   giving it back again (the draws' part is idempotent through the ledger rows). A lease
 *   released in the same batch is not shrunk: its DELETE frees what it still holds.
 * - Only budgets with something to change are locked, in the one global order
 *   (`ORDER BY scope, scope_id FOR UPDATE`); the sort consumes the DELETE and INSERT first, so
 *   no budget lock is held while waiting on anything else. Cache hits (cost 0, no reservation)
 *   lock nothing.
 *
 * $1 now, $2 day start, $3 week start, $4 month start, $5 reservation ids (jsonb array),
 * $6 ledger rows (jsonb array of objects with the columns below; bigints as strings),
 * $7 amounts to take off lease rows (jsonb array of {id, nanos}).
 */
export const FLUSH_SQL = `
WITH entries AS MATERIALIZED (
  SELECT * FROM jsonb_to_recordset($6::jsonb)
    AS x(charge_id uuid, request_id text, attempt smallint, key_id text, user_id uuid, department_id uuid, model text,
         prompt_tokens integer, completion_tokens integer, cost_nanos bigint, cost_source text, status integer, outcome text,
         cache text, task_type text, door text, created_at timestamptz, lease_id uuid, cache_hits integer)
), ledger AS (
  INSERT INTO usage_ledger (charge_id, request_id, attempt, key_id, user_id, department_id, model, prompt_tokens, completion_tokens,
                            cost_nanos, cost_source, status, outcome, cache, task_type, door, created_at, cache_hits)
  SELECT charge_id, request_id, attempt, key_id, user_id, department_id, model, prompt_tokens, completion_tokens,
         cost_nanos, cost_source, status, outcome, cache, task_type, door, created_at, cache_hits
    FROM entries
  ON CONFLICT (charge_id, attempt) DO NOTHING
  RETURNING charge_id, attempt, user_id, department_id, cost_nanos, created_at
), released AS (
  DELETE FROM budget_reservations
   WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($5::jsonb))
  RETURNING user_id, department_id, user_nanos, department_nanos
), draws AS MATERIALIZED (
  SELECT d.lease_id,
         COALESCE(sum(d.cost) FILTER (WHERE NOT d.give_back), 0)::bigint AS drawn,
         COALESCE(sum(d.cost) FILTER (WHERE d.give_back), 0)::bigint AS given,
         bool_or(d.give_back) AS give_back
    FROM (SELECT e.lease_id, l.cost_nanos AS cost, false AS give_back
            FROM ledger l JOIN entries e ON e.charge_id = l.charge_id AND e.attempt = l.attempt
           WHERE e.lease_id IS NOT NULL AND l.cost_nanos > 0
          UNION ALL
          SELECT (t->>'id')::uuid, (t->>'nanos')::bigint, true FROM jsonb_array_elements($7::jsonb) t) d
   WHERE d.lease_id NOT IN (SELECT value::uuid FROM jsonb_array_elements_text($5::jsonb))
   GROUP BY d.lease_id
), shrink AS MATERIALIZED (
  SELECT r.id, r.user_id, r.department_id, d.give_back,
         LEAST(r.user_nanos, d.drawn + CASE WHEN r.given_back THEN 0 ELSE d.given END) AS user_nanos,
         LEAST(r.department_nanos, d.drawn + CASE WHEN r.given_back THEN 0 ELSE d.given END) AS department_nanos
    FROM budget_reservations r JOIN draws d ON r.id = d.lease_id
     FOR UPDATE OF r
), shrunk AS (
  UPDATE budget_reservations r
     SET user_nanos = r.user_nanos - s.user_nanos, department_nanos = r.department_nanos - s.department_nanos,
         given_back = r.given_back OR s.give_back
    FROM shrink s
   WHERE r.id = s.id
  RETURNING r.id
), moves AS MATERIALIZED (
  SELECT 'user'::text AS scope, user_id AS scope_id, cost_nanos AS cost, created_at, 0::bigint AS freed FROM ledger WHERE cost_nanos > 0
  UNION ALL
  SELECT 'department'::text, department_id, cost_nanos, created_at, 0::bigint FROM ledger WHERE cost_nanos > 0
  UNION ALL
  SELECT 'user'::text, user_id, 0::bigint, NULL::timestamptz, user_nanos FROM released WHERE user_nanos > 0
  UNION ALL
  SELECT 'department'::text, department_id, 0::bigint, NULL::timestamptz, department_nanos FROM released WHERE department_nanos > 0
  UNION ALL
  SELECT 'user'::text, user_id, 0::bigint, NULL::timestamptz, user_nanos FROM shrink WHERE user_nanos > 0
  UNION ALL
  SELECT 'department'::text, department_id, 0::bigint, NULL::timestamptz, department_nanos FROM shrink WHERE department_nanos > 0
), locked AS MATERIALIZED (
  SELECT b.scope, b.scope_id, GREATEST(b.period_start, ${currentStart('$2', '$3', '$4')}) AS start
    FROM budgets b
   WHERE (b.scope, b.scope_id) IN (SELECT scope, scope_id FROM moves)
   ORDER BY b.scope, b.scope_id
     FOR UPDATE OF b
), amounts AS MATERIALIZED (
  SELECT l.scope, l.scope_id, l.start,
         COALESCE(sum(m.cost) FILTER (WHERE m.created_at >= l.start), 0)::bigint AS cost,
         COALESCE(sum(m.freed), 0)::bigint AS freed
    FROM locked l JOIN moves m ON m.scope = l.scope AND m.scope_id = l.scope_id
   GROUP BY l.scope, l.scope_id, l.start
), charged AS (
  UPDATE budgets b
     SET spent_nanos = CASE WHEN b.period_start < a.start THEN 0::bigint ELSE b.spent_nanos END + a.cost,
         period_start = a.start,
         reserved_nanos = GREATEST(0::bigint, b.reserved_nanos - a.freed),
         updated_at = $1::timestamptz
    FROM amounts a
   WHERE b.scope = a.scope AND b.scope_id = a.scope_id
  RETURNING b.scope
)
SELECT (SELECT count(*) FROM ledger) AS recorded, (SELECT count(*) FROM released) AS released, (SELECT count(*) FROM charged) AS charged,
       (SELECT count(*) FROM shrunk) AS shrunk`;

/**
 * Renew: marks the reservations this instance still holds (exact reservations of calls in
 * flight, lease rows not yet released) as alive, so that the sweeper, which releases rows not
 * renewed for BUDGET_RESERVATION_TTL_MS, only ever takes those of an instance that stopped
 * renewing them: one that died. `created_at` therefore means "created or last renewed". One
 * statement per renewal interval for all of an instance's rows (BudgetService), never one per
 * request: the request path does not pay for it.
 *
 * `SKIP LOCKED`: a row the writer is deleting or shrinking at this moment (or the sweeper
 * deleting) is left for the next renewal, so this statement never waits on a row lock and
 * cannot deadlock with a flush. A sweep that waits on this statement's lock re-reads the row
 * after it commits and no longer finds it old. Never moves a row's time backwards.
 *
 * $1 reservation ids (jsonb array), $2 now.
 */
export const RENEW_SQL = `
WITH mine AS MATERIALIZED (
  SELECT id FROM budget_reservations
   WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb))
     FOR UPDATE SKIP LOCKED
), renewed AS (
  UPDATE budget_reservations r SET created_at = GREATEST(r.created_at, $2::timestamptz)
    FROM mine m
   WHERE r.id = m.id
  RETURNING r.id
)
SELECT count(*) AS renewed FROM renewed`;

/** $1 request ids (text array), $2 user id: a row when any of them still holds an exact reservation. */
export const HELD_BY_SQL = `SELECT 1 FROM budget_reservations WHERE request_id = ANY($1::text[]) AND user_id = $2::uuid LIMIT 1`;

/**
 * Sweep: releases reservations not renewed for BUDGET_RESERVATION_TTL_MS (RENEW_SQL): left by an
 * instance that died between reserve and settle. Their cost is unknown and not charged.
 *
 * $1 cutoff, $2 now.
 */
export const SWEEP_SQL = `
WITH released AS (
  DELETE FROM budget_reservations WHERE created_at < $1::timestamptz
  RETURNING user_id, department_id, user_nanos, department_nanos
), amounts AS MATERIALIZED (
  SELECT 'user'::text AS scope, user_id AS scope_id, sum(user_nanos)::bigint AS nanos FROM released WHERE user_nanos > 0 GROUP BY user_id
  UNION ALL
  SELECT 'department'::text, department_id, sum(department_nanos)::bigint FROM released WHERE department_nanos > 0 GROUP BY department_id
), locked AS MATERIALIZED (
  SELECT b.scope, b.scope_id, a.nanos
    FROM budgets b JOIN amounts a ON a.scope = b.scope AND a.scope_id = b.scope_id
   ORDER BY b.scope, b.scope_id
     FOR UPDATE OF b
), freed AS (
  UPDATE budgets b SET reserved_nanos = GREATEST(0::bigint, b.reserved_nanos - l.nanos), updated_at = $2::timestamptz
    FROM locked l
   WHERE b.scope = l.scope AND b.scope_id = l.scope_id
  RETURNING b.scope
)
SELECT (SELECT count(*) FROM released) AS released, (SELECT count(*) FROM freed) AS budgets`;
