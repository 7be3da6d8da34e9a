import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { type Nanos, parseUsd } from '../../../libs/money/src/index.js';
import { GatewayError } from '../../core/errors.js';
import { asBody } from '../../core/validate.js';
import type { BudgetScope, BudgetView } from '../budget.types.js';
import { BUDGET_PERIODS, type BudgetPeriod, isBudgetPeriod } from '../periods.js';

/** Far above any real budget, and far below where bigint sums of nano-dollars could overflow. */
const MAX_LIMIT_USD = 1_000_000_000;

export class PutBudgetDto {
  @ApiProperty({ example: 50, description: 'USD per period (a JSON number, or a decimal string for exactness)' }) limit_usd!: number;
  @ApiProperty({ enum: BUDGET_PERIODS, description: 'UTC; weeks start Monday; total never resets' }) period!: BudgetPeriod;

  static parse(raw: unknown): { limitNanos: Nanos; period: BudgetPeriod } {
    const body = asBody(raw);
    const limit = body.limit_usd;
    if (limit === undefined || limit === null) throw new GatewayError('missing_field', "Missing required parameter: 'limit_usd'.", { param: 'limit_usd' });
    const nanos = typeof limit === 'number' || typeof limit === 'string' ? parseUsd(limit) : undefined;
    if (nanos === undefined) throw new GatewayError('invalid_value', "'limit_usd' must be a number of US dollars, e.g. 50 or 0.25.", { param: 'limit_usd' });
    if (nanos < 0n) throw new GatewayError('invalid_value', "'limit_usd' must be at least 0.", { param: 'limit_usd' });
    if (nanos > BigInt(MAX_LIMIT_USD) * 1_000_000_000n)
      throw new GatewayError('invalid_value', `'limit_usd' must be at most ${MAX_LIMIT_USD}.`, { param: 'limit_usd' });
    const period = body.period;
    if (period === undefined || period === null) throw new GatewayError('missing_field', "Missing required parameter: 'period'.", { param: 'period' });
    if (!isBudgetPeriod(period)) throw new GatewayError('invalid_value', `'period' must be one of ${BUDGET_PERIODS.join(', ')}.`, { param: 'period' });
    return { limitNanos: nanos, period };
  }
}

export class BudgetViewDto {
  @ApiProperty({ enum: ['user', 'department'] }) scope!: BudgetScope;
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty({ nullable: true, description: 'null: no budget (unlimited)' }) limit_usd!: number | null;
  @ApiProperty({ enum: BUDGET_PERIODS, nullable: true }) period!: BudgetPeriod | null;
  @ApiProperty({ nullable: true }) spent_usd!: number | null;
  @ApiProperty({ nullable: true }) reserved_usd!: number | null;
  @ApiProperty({ nullable: true }) remaining_usd!: number | null;
  @ApiProperty({ format: 'date-time', nullable: true }) period_start!: string | null;
  @ApiPropertyOptional({ format: 'date-time', nullable: true, description: 'when the period rolls over (null for total)' }) resets_at!: string | null;
}

/** A scope without a budget row is unlimited; say so explicitly rather than 404 (the user exists). */
export function budgetOrUnlimited(scope: BudgetScope, id: string, view: BudgetView | null): BudgetViewDto {
  return view ?? { scope, id, limit_usd: null, period: null, spent_usd: null, reserved_usd: null, remaining_usd: null, period_start: null, resets_at: null };
}
