import { Injectable } from '@nestjs/common';
import { DataSource } from 'typeorm';
import { type Nanos, toUsdNumber } from '../../libs/money/src/index.js';
import { Clock } from '../core/clock.js';
import { GatewayError } from '../core/errors.js';
import { BudgetService } from './budget.service.js';
import type { BudgetRow, BudgetScope, BudgetView } from './budget.types.js';
import { type BudgetPeriod, currentPeriodStart, nextReset, periodOf, periodStarts } from './periods.js';

const SCOPE_TABLE: Record<BudgetScope, { table: string; ledgerColumn: string; heldColumn: string }> = {
  user: { table: 'users', ledgerColumn: 'user_id', heldColumn: 'user_nanos' },
  department: { table: 'departments', ledgerColumn: 'department_id', heldColumn: 'department_nanos' },
};

const BUDGET_COLUMNS = 'scope, scope_id, limit_nanos, period, period_start, spent_nanos, reserved_nanos';

/**
 * Setting and reading budgets (the admin API and /v1/usage); the hot path is BudgetService.
 * Every view first stores this instance's queued settles, so a caller reads its own finished
 * requests right after their responses (other instances' land within their BUDGET_FLUSH_MS).
 */
@Injectable()
export class BudgetSettingsService {
  constructor(
    private readonly dataSource: DataSource,
    private readonly clock: Clock,
    private readonly budget: BudgetService,
  ) {}

  /**
   * Creates or replaces a budget. A new budget (or a new period) starts with what the ledger
   * already holds for the current period, so `spent` always equals the ledger's sum for the
   * period, and a budget set at noon counts the morning's spend. Changing only the limit keeps
   * `spent`, `reserved` and the period as they are. A `total` budget counts from now.
   */
  async set(scope: BudgetScope, id: string, limitNanos: Nanos, period: BudgetPeriod): Promise<BudgetView> {
    await this.assertExists(scope, id);
    await this.budget.flush();
    // A DELETE of the same budget (another admin, another instance) can land between the upsert
    // and a period change, which then finds no row. The PUT still means "this budget from now
    // on": once more, the row is created afresh with the new period. Twice in a row is a 409.
    const row = (await this.upsert(scope, id, limitNanos, period)) ?? (await this.upsert(scope, id, limitNanos, period));
    if (!row) throw new GatewayError('conflict', 'The budget was deleted while it was being changed, twice; send the change again.');
    // A request of this scope may have taken a lease under the old limit while the flush above
    // ran: this instance applies the new budget from now on.
    this.budget.retireLeases();
    // Read once more after this instance's retired leases are given back: a new budget starts
    // holding every lease of its scope, and the answer should show what still holds money (calls
    // in flight, other instances' leases), not headroom this instance has just returned.
    // The change is made: a failed read only costs the answer its precision.
    return (await this.find(scope, id).catch(() => null)) ?? this.view(row);
  }

  /** The budget row as set, or undefined when it was deleted before its period could change. */
  private async upsert(scope: BudgetScope, id: string, limitNanos: Nanos, period: BudgetPeriod): Promise<BudgetRow | undefined> {
    const now = this.clock.now();
    const start = period === 'total' ? now : currentPeriodStart(period, periodStarts(now), now);
    const { ledgerColumn, heldColumn } = SCOPE_TABLE[scope];
    const upsert = `INSERT INTO budgets AS b (scope, scope_id, limit_nanos, period, period_start, spent_nanos, reserved_nanos, created_at, updated_at)
       VALUES ($1, $2::uuid, $3::bigint, $4, $5::timestamptz,
               (SELECT COALESCE(sum(cost_nanos), 0)::bigint FROM usage_ledger WHERE ${ledgerColumn} = $2::uuid AND created_at >= $5::timestamptz),
               (SELECT COALESCE(sum(${heldColumn}), 0)::bigint FROM budget_reservations WHERE ${ledgerColumn} = $2::uuid),
               $6::timestamptz, $6::timestamptz)
       ON CONFLICT (scope, scope_id) DO UPDATE SET limit_nanos = EXCLUDED.limit_nanos, updated_at = EXCLUDED.updated_at
       RETURNING ${BUDGET_COLUMNS}`;
    const params = [scope, id, limitNanos.toString(), period, start.toISOString(), now.toISOString()];
    // An existing row only takes the new limit: one statement, no lock.
    const updated = await this.dataSource.query<BudgetRow[]>(
      `WITH changed AS (UPDATE budgets SET limit_nanos = $3::bigint, updated_at = $4::timestamptz WHERE scope = $1 AND scope_id = $2::uuid RETURNING ${BUDGET_COLUMNS})
       SELECT * FROM changed`,
      [scope, id, limitNanos.toString(), now.toISOString()],
    );
    // A new row starts holding what reservations still hold on its scope (requests in flight and
    // every lease, taken with or without a budget: RESERVE_SQL records each with its worst case on
    // both scopes): their settles and releases will take it off this row. No reservation may
    // change between that sum and the new row becoming visible: a flush that shrank or released
    // one without seeing the row would leave it counting money no longer held, for good, and a
    // reserve that decided without seeing it would record a row it never counted. So the
    // reservations table is locked for those few milliseconds (reserve and flush wait, and take
    // their lock before they read the budgets). Only for a new row, which no reservation
    // statement can hold a lock on, so the two cannot deadlock; an existing row keeps its
    // `reserved`. Whether the row exists is what the UPDATE above found, not a read before it:
    // a row deleted between such a read and the upsert was inserted anew without the lock.
    const rows =
      updated.length > 0
        ? updated
        : await this.dataSource.transaction(async (manager) => {
            await manager.query('LOCK TABLE budget_reservations IN SHARE ROW EXCLUSIVE MODE');
            return manager.query<BudgetRow[]>(upsert, params);
          });
    const row: BudgetRow | undefined = rows[0];
    if (!row) throw new Error('budget upsert returned no row');
    // The upsert changes only the limit of an existing budget; a new period is set apart.
    return row.period === period ? row : this.changePeriod(scope, id, period, start, now);
  }

  /**
   * Moves an existing budget to a new period, whose `spent` is the ledger's sum since its start.
   * The row is locked first, by a statement of its own: a flush charging it (another instance's,
   * or this one's timer) has committed by the time the sum is read, and the sum's statement, with
   * a fresh snapshot (READ COMMITTED), counts that flush's ledger rows. Summed by the statement
   * that waited for the lock, it would read the ledger as it was before the wait and lose that
   * flush's cost from `spent` for good. A flush that comes later waits and adds its cost on top.
   */
  private async changePeriod(scope: BudgetScope, id: string, period: BudgetPeriod, start: Date, now: Date): Promise<BudgetRow | undefined> {
    const { ledgerColumn } = SCOPE_TABLE[scope];
    const rows = await this.dataSource.transaction(async (manager) => {
      await manager.query('SELECT 1 FROM budgets WHERE scope = $1 AND scope_id = $2::uuid FOR UPDATE', [scope, id]);
      return manager.query<BudgetRow[]>(
        // In a WITH: TypeORM answers a bare UPDATE with [rows, count].
        `WITH changed AS (
           UPDATE budgets
              SET period = $3, period_start = $4::timestamptz, updated_at = $5::timestamptz,
                  spent_nanos = (SELECT COALESCE(sum(cost_nanos), 0)::bigint FROM usage_ledger WHERE ${ledgerColumn} = $2::uuid AND created_at >= $4::timestamptz)
            WHERE scope = $1 AND scope_id = $2::uuid
          RETURNING ${BUDGET_COLUMNS}
         )
         SELECT * FROM changed`,
        [scope, id, period, start.toISOString(), now.toISOString()],
      );
    });
    return rows[0];
  }

  /** The budget of a user or department, or null when it has none (unlimited). 404 if unknown. */
  async get(scope: BudgetScope, id: string): Promise<BudgetView | null> {
    await this.assertExists(scope, id);
    return this.find(scope, id);
  }

  async find(scope: BudgetScope, id: string): Promise<BudgetView | null> {
    await this.budget.flush();
    const rows = await this.dataSource.query<BudgetRow[]>(`SELECT ${BUDGET_COLUMNS} FROM budgets WHERE scope = $1 AND scope_id = $2::uuid`, [scope, id]);
    return rows[0] ? this.view(rows[0]) : null;
  }

  /**
   * A caller's user and department budgets (null: none) in one statement, without a flush of its
   * own: for `GET /v1/usage`, which stores this instance's queued settles first and bounds each
   * wait (SpendService.usage).
   */
  async findPair(userId: string, departmentId: string): Promise<{ user: BudgetView | null; department: BudgetView | null }> {
    const rows = await this.dataSource.query<BudgetRow[]>(
      `SELECT ${BUDGET_COLUMNS} FROM budgets WHERE (scope = 'user' AND scope_id = $1::uuid) OR (scope = 'department' AND scope_id = $2::uuid)`,
      [userId, departmentId],
    );
    const of = (scope: BudgetScope) => {
      const row = rows.find((r) => r.scope === scope);
      return row ? this.view(row) : null;
    };
    return { user: of('user'), department: of('department') };
  }

  /** Removes a budget: the scope becomes unlimited (its ledger rows stay). */
  async remove(scope: BudgetScope, id: string): Promise<void> {
    await this.assertExists(scope, id);
    const result = await this.dataSource.query<unknown[]>(`DELETE FROM budgets WHERE scope = $1 AND scope_id = $2::uuid RETURNING scope`, [scope, id]);
    const deleted = Array.isArray(result[0]) ? (result[0] as unknown[]).length : result.length;
    if (deleted === 0) throw new GatewayError('not_found', `The ${scope} '${id}' has no budget.`);
    this.budget.retireLeases();
  }

  /** The current period's numbers, rolled over on read when the stored period has ended. */
  view(row: BudgetRow): BudgetView {
    const { start, rolled } = periodOf(row.period, periodStarts(this.clock.now()), new Date(row.period_start));
    const limit = BigInt(row.limit_nanos);
    const spent = rolled ? 0n : BigInt(row.spent_nanos);
    const reserved = BigInt(row.reserved_nanos);
    const remaining = limit - spent - reserved;
    return {
      scope: row.scope,
      id: row.scope_id,
      limit_usd: toUsdNumber(limit),
      period: row.period,
      spent_usd: toUsdNumber(spent),
      reserved_usd: toUsdNumber(reserved),
      remaining_usd: toUsdNumber(remaining > 0n ? remaining : 0n),
      period_start: start.toISOString(),
      resets_at: nextReset(row.period, start)?.toISOString() ?? null,
    };
  }

  private async assertExists(scope: BudgetScope, id: string): Promise<void> {
    const rows = await this.dataSource.query<unknown[]>(`SELECT 1 FROM ${SCOPE_TABLE[scope].table} WHERE id = $1::uuid`, [id]);
    if (rows.length === 0) throw new GatewayError('not_found', `No ${scope} with id '${id}'.`);
  }
}
