import { Injectable } from '@nestjs/common';
import { DataSource } from 'typeorm';
import { toUsdJson, type UsdJson } from '../../libs/money/src/index.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { databaseStep } from '../core/deadline.js';
import { GatewayError } from '../core/errors.js';
import type { Principal } from '../identity/principal.js';
import { BudgetSettingsService } from './budget-settings.service.js';
import { BudgetService } from './budget.service.js';
import type { BudgetView } from './budget.types.js';
import { budgetViewJson } from './admin/budget-admin.dto.js';
import { currentPeriodStart, periodStarts } from './periods.js';

export const SPEND_GROUPS = ['user', 'department', 'model'] as const;
export type SpendGroup = (typeof SPEND_GROUPS)[number];

export interface SpendWindow {
  from: Date | undefined;
  to: Date | undefined;
}

interface SpendRow {
  key: string;
  name: string | null;
  requests: string | number;
  attempts: string | number;
  prompt_tokens: string | number;
  completion_tokens: string | number;
  cost_nanos: string;
}

export interface SpendLine {
  requests: number;
  attempts: number;
  prompt_tokens: number;
  completion_tokens: number;
  /** The exact plain decimal in the JSON ("0.000000001", not "1e-9"). */
  cost_usd: UsdJson;
}

// Column and display name per grouping; fixed strings, never user input, in the SQL.
const GROUPS: Record<SpendGroup, { column: string; field: string; nameJoin: string; name: string }> = {
  user: { column: 'l.user_id::text', field: 'user_id', nameJoin: 'LEFT JOIN users n ON n.id = l.user_id', name: 'n.name' },
  department: { column: 'l.department_id::text', field: 'department_id', nameJoin: 'LEFT JOIN departments n ON n.id = l.department_id', name: 'n.name' },
  model: { column: 'l.model', field: 'model', nameJoin: '', name: 'NULL::text' },
};

/**
 * Spend reports read from the ledger: `GET /admin/spend` and each caller's `GET /v1/usage`. Both
 * store this instance's queued ledger rows first (see BudgetSettingsService).
 */
@Injectable()
export class SpendService {
  constructor(
    private readonly dataSource: DataSource,
    private readonly clock: Clock,
    private readonly budgets: BudgetSettingsService,
    private readonly budget: BudgetService,
    private readonly config: AppConfig,
  ) {}

  /** Company-wide spend grouped by user, department or model; the window defaults to this UTC month. */
  async report(groupBy: SpendGroup, window: SpendWindow) {
    const { from, to } = this.window(window, null);
    await this.budget.flush();
    const g = GROUPS[groupBy];
    const rows = await this.query(g, '', [], from, to);
    let total = 0n;
    const data = rows.map((row) => {
      total += BigInt(row.cost_nanos);
      return { [g.field]: row.key, ...(groupBy === 'model' ? {} : { name: row.name }), ...line(row) };
    });
    return { object: 'list', group_by: groupBy, from: from.toISOString(), to: to?.toISOString() ?? null, data, total_cost_usd: toUsdJson(total) };
  }

  /**
   * The caller's own budgets and spend per model. The window defaults to the user's current
   * budget period (or this UTC month when the user has no budget).
   *
   * A caller's request: each wait on the database (storing this instance's queued settles, then
   * two reads) is bounded by DATABASE_REQUEST_TIMEOUT_MS and answered 503 `unavailable` past it,
   * as the completion path is, not held for as long as the database is stuck.
   */
  async usage(principal: Principal, window: SpendWindow) {
    await this.budget.flushForRequest();
    const { user, department } = await this.bounded(this.budgets.findPair(principal.userId, principal.departmentId));
    const { from, to } = this.window(window, user);
    const rows = await this.bounded(this.query(GROUPS.model, 'AND l.user_id = $3::uuid', [principal.userId], from, to));
    let total = 0n;
    const spend = rows.map((row) => {
      total += BigInt(row.cost_nanos);
      return { model: row.key, ...line(row) };
    });
    return {
      object: 'gateway.usage',
      // A scope without a budget is unlimited, said as the admin GET says it: a client reading
      // `department.limit_usd` must not find `department` null (API.md: a budget view).
      user: budgetViewJson('user', principal.userId, user),
      department: budgetViewJson('department', principal.departmentId, department),
      from: from.toISOString(),
      to: to?.toISOString() ?? null,
      spend,
      total_cost_usd: toUsdJson(total),
    };
  }

  /** A read on a caller's path, given up on after DATABASE_REQUEST_TIMEOUT_MS (its other failures are mapped as any database error is). */
  private bounded<T>(work: Promise<T>): Promise<T> {
    return databaseStep(
      work,
      this.config.databaseRequestTimeoutMs,
      (cause) => new GatewayError('unavailable', 'Usage cannot be read right now (database unavailable).', { cause }),
    );
  }

  /**
   * Without `from`, the window starts where the period containing its end starts: the budget's
   * period (or the UTC month) of now, or, when only `to` is given, of the last instant before
   * `to` (exclusive), so `?to=` alone never starts after it.
   */
  private window(window: SpendWindow, budget: BudgetView | null): { from: Date; to: Date | undefined } {
    const from = window.from ?? defaultFrom(budget, window.to, this.clock.now());
    if (window.to && window.to.getTime() <= from.getTime()) throw new GatewayError('invalid_value', "'to' must be later than 'from'.", { param: 'to' });
    return { from, to: window.to };
  }

  /**
   * A request is one charge: the ledger rows of one settle (its attempts) share a charge id, the
   * reservation's. Not the request id: callers choose it (`x-request-id`) and job tries repeat it,
   * so distinct calls can share one. A row counting cache hits stands for `cache_hits` requests.
   * Rows from before charge ids (migration LedgerChargeId1764400002100) are counted by request id.
   */
  private async query(g: (typeof GROUPS)[SpendGroup], extraWhere: string, extraParams: unknown[], from: Date, to: Date | undefined): Promise<SpendRow[]> {
    return await this.dataSource.query<SpendRow[]>(
      `SELECT ${g.column} AS key, ${g.name} AS name,
              count(DISTINCT l.charge_id) FILTER (WHERE l.cache_hits IS NULL)
                + count(DISTINCT l.request_id) FILTER (WHERE l.charge_id IS NULL AND l.cache_hits IS NULL)
                + COALESCE(sum(l.cache_hits), 0) AS requests,
              count(*) FILTER (WHERE l.cache_hits IS NULL) + COALESCE(sum(l.cache_hits), 0) AS attempts,
              COALESCE(sum(l.prompt_tokens), 0) AS prompt_tokens, COALESCE(sum(l.completion_tokens), 0) AS completion_tokens,
              COALESCE(sum(l.cost_nanos), 0)::bigint AS cost_nanos
         FROM usage_ledger l ${g.nameJoin}
        WHERE l.created_at >= $1::timestamptz AND ($2::timestamptz IS NULL OR l.created_at < $2::timestamptz) ${extraWhere}
        GROUP BY 1, 2
        ORDER BY sum(l.cost_nanos) DESC, 1`,
      [from.toISOString(), to?.toISOString() ?? null, ...extraParams],
    );
  }
}

const FIRST_TIME = -62_135_596_800_000; // 0001-01-01T00:00:00Z

function defaultFrom(budget: BudgetView | null, to: Date | undefined, now: Date): Date {
  if (to === undefined) return budget ? new Date(budget.period_start) : periodStarts(now).month;
  // Never before 0001-01-01, the first day the database takes (`to` is at least that).
  const end = new Date(Math.max(to.getTime() - 1, FIRST_TIME));
  const month = periodStarts(end).month;
  if (!budget) return month;
  // A `total` budget's period began when it was set: the start, when `to` falls after it.
  const start = currentPeriodStart(budget.period, periodStarts(end), new Date(budget.period_start));
  return start.getTime() < to.getTime() ? start : month;
}

function line(row: SpendRow): SpendLine {
  return {
    requests: Number(row.requests),
    attempts: Number(row.attempts),
    prompt_tokens: Number(row.prompt_tokens),
    completion_tokens: Number(row.completion_tokens),
    cost_usd: toUsdJson(BigInt(row.cost_nanos)),
  };
}
