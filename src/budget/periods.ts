/**
 * Budget periods, all in UTC. The SQL never computes a period boundary itself: the service
 * passes the current day / week / month starts as parameters (from the injected Clock), so the
 * rule lives here once, PGlite and PostgreSQL agree by construction, and tests can move time.
 */
export const BUDGET_PERIODS = ['daily', 'weekly', 'monthly', 'total'] as const;
export type BudgetPeriod = (typeof BUDGET_PERIODS)[number];

export interface PeriodStarts {
  day: Date;
  /** Monday 00:00 UTC (ISO weeks). */
  week: Date;
  month: Date;
}

const DAY_MS = 86_400_000;

export function periodStarts(now: Date): PeriodStarts {
  const y = now.getUTCFullYear();
  const m = now.getUTCMonth();
  const day = Date.UTC(y, m, now.getUTCDate());
  // getUTCDay: 0 = Sunday … 6 = Saturday; days since Monday.
  const sinceMonday = (now.getUTCDay() + 6) % 7;
  return { day: new Date(day), week: new Date(day - sinceMonday * DAY_MS), month: new Date(Date.UTC(y, m, 1)) };
}

/** Start of the period `now` falls in. `total` never rolls over: its start is when the budget was set. */
export function currentPeriodStart(period: BudgetPeriod, starts: PeriodStarts, storedStart: Date): Date {
  switch (period) {
    case 'daily':
      return starts.day;
    case 'weekly':
      return starts.week;
    case 'monthly':
      return starts.month;
    case 'total':
      return storedStart;
  }
}

/**
 * The period a stored budget row is in at `starts`: its stored period, or, once that has ended,
 * the current one, in which nothing is spent yet (`rolled`: read its spend as 0). The row itself
 * rolls over at its next reserve or settle (budget-sql.ts); views and checks read it this way.
 */
export function periodOf(period: BudgetPeriod, starts: PeriodStarts, storedStart: Date): { start: Date; rolled: boolean } {
  const current = currentPeriodStart(period, starts, storedStart);
  const rolled = storedStart.getTime() < current.getTime();
  return { start: rolled ? current : storedStart, rolled };
}

/** When the period that began at `start` ends; null for `total`. */
export function nextReset(period: BudgetPeriod, start: Date): Date | null {
  switch (period) {
    case 'daily':
      return new Date(start.getTime() + DAY_MS);
    case 'weekly':
      return new Date(start.getTime() + 7 * DAY_MS);
    case 'monthly':
      return new Date(Date.UTC(start.getUTCFullYear(), start.getUTCMonth() + 1, 1));
    case 'total':
      return null;
  }
}

export function isBudgetPeriod(value: unknown): value is BudgetPeriod {
  return typeof value === 'string' && (BUDGET_PERIODS as readonly string[]).includes(value);
}
