/**
 * The budget's hot-path statements. Each is ONE statement (one round trip, its own implicit
 * transaction) on PostgreSQL and PGlite alike.
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
  SELECT COALESCE(bool_and(spent_nanos + reserved_nanos + $3::bigint <= limit_nanos), true) AS ok,
         COALESCE(bool_or(scope = 'user'), false) AS has_user,
         COALESCE(bool_or(scope = 'department'), false) AS has_department
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
  SELECT $8::uuid, $9, $1::uuid, $2::uuid,
         CASE WHEN v.has_user THEN $3::bigint ELSE 0 END,
         CASE WHEN v.has_department THEN $3::bigint ELSE 0 END,
         $4::timestamptz
    FROM verdict v
   WHERE v.ok AND (v.has_user OR v.has_department) AND $3::bigint > 0
  RETURNING id
)
SELECT v.ok, s.scope, s.limit_nanos, s.period, s.period_start, s.spent_nanos, s.reserved_nanos,
       (SELECT count(*) FROM held) AS held, (SELECT count(*) FROM recorded) AS recorded
  FROM verdict v LEFT JOIN state s ON true`;

/**
 * Settle (and release, which is a settle of what failed attempts cost): deletes the
 * reservation, takes back what it held, adds the actual cost to `spent` (rolling the period
 * over if it ended meanwhile), and writes one ledger row per upstream attempt. The cost added to
 * `spent` is summed from the very rows inserted, so spent == Σ ledger holds by construction.
 * If the sweeper released the reservation first, nothing is taken back twice: the DELETE finds
 * no row and only the cost is added.
 *
 * $1 reservation id, $2 user_id, $3 department_id, $4 now, $5 day, $6 week, $7 month,
 * $8 request id, $9 key id, $10 cache status, $11 task type, $12 door, $13 attempts (jsonb array).
 */
export const SETTLE_SQL = `
WITH attempts AS MATERIALIZED (
  SELECT * FROM jsonb_to_recordset($13::jsonb)
    AS x(attempt smallint, model text, prompt_tokens integer, completion_tokens integer, cost_nanos bigint, cost_source text, status integer, outcome text)
), released AS (
  DELETE FROM budget_reservations WHERE id = $1::uuid RETURNING user_nanos, department_nanos
), locked AS MATERIALIZED (
  SELECT scope, scope_id, ${currentStart('$5', '$6', '$7')} AS current_start
    FROM budgets
   WHERE (scope = 'user' AND scope_id = $2::uuid) OR (scope = 'department' AND scope_id = $3::uuid)
   ORDER BY scope, scope_id
     FOR UPDATE
), charged AS (
  UPDATE budgets b
     SET spent_nanos = CASE WHEN b.period_start < l.current_start THEN 0::bigint ELSE b.spent_nanos END
                       + (SELECT COALESCE(sum(cost_nanos), 0)::bigint FROM attempts),
         period_start = GREATEST(b.period_start, l.current_start),
         reserved_nanos = GREATEST(0::bigint, b.reserved_nanos
                       - COALESCE((SELECT CASE b.scope WHEN 'user' THEN r.user_nanos ELSE r.department_nanos END FROM released r), 0::bigint)),
         updated_at = $4::timestamptz
    FROM locked l
   WHERE b.scope = l.scope AND b.scope_id = l.scope_id
  RETURNING b.scope
), ledger AS (
  INSERT INTO usage_ledger (request_id, attempt, key_id, user_id, department_id, model, prompt_tokens, completion_tokens,
                            cost_nanos, cost_source, status, outcome, cache, task_type, door, created_at)
  SELECT $8, a.attempt, $9, $2::uuid, $3::uuid, a.model, a.prompt_tokens, a.completion_tokens,
         a.cost_nanos, a.cost_source, a.status, a.outcome, $10, $11, $12, $4::timestamptz
    FROM attempts a
  RETURNING 1
)
SELECT (SELECT count(*) FROM released) AS released, (SELECT count(*) FROM charged) AS charged, (SELECT count(*) FROM ledger) AS recorded`;

/**
 * Sweep: releases reservations older than the request deadline, left by an instance that died
 * between reserve and settle. Their cost is unknown and not charged.
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

/** A cache hit: one free ledger row, no budget change. */
export const CACHE_HIT_SQL = `
INSERT INTO usage_ledger (request_id, attempt, key_id, user_id, department_id, model, prompt_tokens, completion_tokens,
                          cost_nanos, cost_source, status, outcome, cache, task_type, door, created_at)
VALUES ($1, 0, $2, $3::uuid, $4::uuid, $5, $6, $7, 0, 'cache', 200, 'ok', 'hit', $8, $9, $10::timestamptz)`;
