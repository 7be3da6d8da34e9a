import { describe, expect, it } from 'vitest';
import { type BudgetPeriod, currentPeriodStart, nextReset, periodStarts } from './periods.js';

// Golden cases, all UTC: weeks start Monday; months of every length; `total` never rolls.
const CASES: Array<[now: string, period: BudgetPeriod, start: string, reset: string | null]> = [
  ['2026-01-07T12:00:00.000Z', 'daily', '2026-01-07T00:00:00.000Z', '2026-01-08T00:00:00.000Z'],
  ['2026-01-07T00:00:00.000Z', 'daily', '2026-01-07T00:00:00.000Z', '2026-01-08T00:00:00.000Z'],
  ['2026-01-07T23:59:59.999Z', 'daily', '2026-01-07T00:00:00.000Z', '2026-01-08T00:00:00.000Z'],
  ['2026-12-31T18:00:00.000Z', 'daily', '2026-12-31T00:00:00.000Z', '2027-01-01T00:00:00.000Z'],
  ['2026-01-07T12:00:00.000Z', 'weekly', '2026-01-05T00:00:00.000Z', '2026-01-12T00:00:00.000Z'], // Wednesday
  ['2026-01-05T00:00:00.000Z', 'weekly', '2026-01-05T00:00:00.000Z', '2026-01-12T00:00:00.000Z'], // Monday 00:00
  ['2026-01-11T23:59:59.000Z', 'weekly', '2026-01-05T00:00:00.000Z', '2026-01-12T00:00:00.000Z'], // Sunday night
  ['2027-01-01T08:00:00.000Z', 'weekly', '2026-12-28T00:00:00.000Z', '2027-01-04T00:00:00.000Z'], // across a year
  ['2026-01-31T12:00:00.000Z', 'monthly', '2026-01-01T00:00:00.000Z', '2026-02-01T00:00:00.000Z'],
  ['2026-02-15T12:00:00.000Z', 'monthly', '2026-02-01T00:00:00.000Z', '2026-03-01T00:00:00.000Z'],
  ['2028-02-29T12:00:00.000Z', 'monthly', '2028-02-01T00:00:00.000Z', '2028-03-01T00:00:00.000Z'], // leap year
  ['2026-12-10T12:00:00.000Z', 'monthly', '2026-12-01T00:00:00.000Z', '2027-01-01T00:00:00.000Z'],
];

describe('budget periods (UTC)', () => {
  it.each(CASES)('at %s a %s budget started at %s and resets at %s', (now, period, start, reset) => {
    const current = currentPeriodStart(period, periodStarts(new Date(now)), new Date(0));
    expect(current.toISOString()).toBe(start);
    expect(nextReset(period, current)?.toISOString() ?? null).toBe(reset);
  });

  it('a total budget keeps the start it was set with and never resets', () => {
    const setAt = new Date('2025-03-04T05:06:07.000Z');
    const current = currentPeriodStart('total', periodStarts(new Date('2030-01-01T00:00:00Z')), setAt);
    expect(current).toBe(setAt);
    expect(nextReset('total', current)).toBeNull();
  });
});
