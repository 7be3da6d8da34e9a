import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { type Nanos, parseUsd, toUsdJson, type UsdJson } from '../../../libs/money/src/index.js';
import { GatewayError } from '../../core/errors.js';
import { asBody, rejectUnknownFields } from '../../core/validate.js';
import type { BudgetScope, BudgetView } from '../budget.types.js';
import { BUDGET_PERIODS, type BudgetPeriod, isBudgetPeriod } from '../periods.js';

/**
 * Far above any real budget, far below where bigint sums of nano-dollars could overflow, and
 * below 2^23 USD: up to there every nano-dollar amount is its own double, so a limit (and the
 * spent, reserved and remaining amounts beside it) reads back exactly as a JSON number.
 */
export const MAX_LIMIT_USD = 8_000_000;

export class PutBudgetDto {
  @ApiProperty({ example: 50, description: 'USD per period (a JSON number, or a decimal string for exactness)' }) limit_usd!: number;
  @ApiProperty({ enum: BUDGET_PERIODS, description: 'UTC; weeks start Monday; total never resets' }) period!: BudgetPeriod;

  static parse(raw: unknown): { limitNanos: Nanos; period: BudgetPeriod } {
    const body = asBody(raw);
    rejectUnknownFields(body, ['limit_usd', 'period']);
    const limit = body.limit_usd;
    if (limit === undefined || limit === null) throw new GatewayError('missing_field', "Missing required parameter: 'limit_usd'.", { param: 'limit_usd' });
    const nanos = typeof limit === 'number' || typeof limit === 'string' ? parseUsd(limit) : undefined;
    if (nanos === undefined) throw new GatewayError('invalid_value', "'limit_usd' must be a number of US dollars, e.g. 50 or 0.25.", { param: 'limit_usd' });
    if (nanos < 0n) throw new GatewayError('invalid_value', "'limit_usd' must be at least 0.", { param: 'limit_usd' });
    // Rounded to the nano-dollar, a positive amount below half of one became 0: a budget that
    // refuses every call, which nobody asked for.
    if (nanos === 0n && !isZero(limit as number | string)) {
      throw new GatewayError('invalid_value', "'limit_usd' is below one nano-dollar (0.000000001); use 0 for a budget that allows no spend.", {
        param: 'limit_usd',
      });
    }
    if (nanos > BigInt(MAX_LIMIT_USD) * 1_000_000_000n)
      throw new GatewayError('invalid_value', `'limit_usd' must be at most ${MAX_LIMIT_USD} (the largest amount a JSON number carries to the nano-dollar).`, {
        param: 'limit_usd',
      });
    const period = body.period;
    if (period === undefined || period === null) throw new GatewayError('missing_field', "Missing required parameter: 'period'.", { param: 'period' });
    if (!isBudgetPeriod(period)) throw new GatewayError('invalid_value', `'period' must be one of ${BUDGET_PERIODS.join(', ')}.`, { param: 'period' });
    return { limitNanos: nanos, period };
  }
}

export class BudgetViewDto {
  @ApiProperty({ enum: ['user', 'department'] }) scope!: BudgetScope;
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty({ type: Number, nullable: true, description: 'null: no budget (unlimited)' }) limit_usd!: UsdJson | number | null;
  @ApiProperty({ enum: BUDGET_PERIODS, nullable: true }) period!: BudgetPeriod | null;
  @ApiProperty({ type: Number, nullable: true }) spent_usd!: UsdJson | number | null;
  @ApiProperty({ type: Number, nullable: true }) reserved_usd!: UsdJson | number | null;
  @ApiProperty({ type: Number, nullable: true }) remaining_usd!: UsdJson | number | null;
  @ApiProperty({ format: 'date-time', nullable: true }) period_start!: string | null;
  @ApiPropertyOptional({ format: 'date-time', nullable: true, description: 'when the period rolls over (null for total)' }) resets_at!: string | null;
}

/**
 * An amount of a BudgetView as the plain decimal it stands for ("0.000000001", not "1e-9"). The
 * view's numbers are exact below MAX_LIMIT_USD, so their shortest text is the decimal itself.
 */
function usdOf(amount: number): UsdJson | number {
  const nanos = parseUsd(amount);
  return nanos === undefined ? amount : toUsdJson(nanos);
}

/** A budget view as a response writes it; a scope without a budget row is unlimited, said explicitly rather than 404 (the user exists). */
export function budgetViewJson(scope: BudgetScope, id: string, view: BudgetView | null): BudgetViewDto {
  if (!view) return { scope, id, limit_usd: null, period: null, spent_usd: null, reserved_usd: null, remaining_usd: null, period_start: null, resets_at: null };
  return {
    ...view,
    limit_usd: usdOf(view.limit_usd),
    spent_usd: usdOf(view.spent_usd),
    reserved_usd: usdOf(view.reserved_usd),
    remaining_usd: usdOf(view.remaining_usd),
  };
}

/** Whether an amount is written as zero: no digit 1-9 before any exponent (`0`, `0.000`, `0e5`). */
function isZero(amount: number | string): boolean {
  if (typeof amount === 'number') return amount === 0;
  return !/[1-9]/.test(amount.split(/[eE]/)[0] ?? '');
}
