import { randomUUID } from 'node:crypto';
import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { formatUsd, type Nanos, tokensCost } from '../../libs/money/src/index.js';
import type { Usage } from '../../libs/openai-contract/src/index.js';
import { Clock } from '../core/clock.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { costOf, type CostSource } from '../upstream/pricing/pricing.js';
import { PricingService } from '../upstream/pricing/pricing.service.js';
import { CACHE_HIT_SQL, RESERVE_SQL, SETTLE_SQL } from './budget-sql.js';
import type { BudgetedCall, BudgetedRoute, BudgetScope, ChargedAttempt, Reservation, SettleOptions } from './budget.types.js';
import { estimatePromptTokens, producedTokens, reservedCompletionTokens } from './estimate.js';
import { type BudgetPeriod, nextReset, periodStarts } from './periods.js';

interface ReserveRow {
  ok: boolean;
  scope: BudgetScope | null;
  limit_nanos: string | null;
  period: BudgetPeriod | null;
  period_start: Date | string | null;
  spent_nanos: string | null;
  reserved_nanos: string | null;
}

/** One ledger line as the settle statement reads it (jsonb: bigints travel as strings). */
interface LedgerLine {
  attempt: number;
  model: string;
  prompt_tokens: number;
  completion_tokens: number;
  cost_nanos: string;
  cost_source: CostSource;
  status: number | null;
  outcome: string;
}

const MAX_INT = 2_147_483_647;

/**
 * The budget stages of the pipeline: reserve the worst case before the upstream call, settle
 * the actual cost after it (or release on failure), and the ledger row of a cache hit.
 *
 * Round trips per request: reserve = 1 statement, settle = 1 statement (see budget-sql.ts), so
 * a budgeted request adds exactly two database round trips, whether or not budgets are set.
 */
@Injectable()
export class BudgetService {
  private readonly logger: Logger;

  constructor(
    private readonly dataSource: DataSource,
    private readonly pricing: PricingService,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Budget' });
  }

  /**
   * The most a call can cost: the prompt estimate at the prompt price plus the completion cap
   * (× `n`) at the completion price, for the most expensive model the chain may fall back to.
   */
  worstCase(call: BudgetedCall, route: BudgetedRoute): { amountNanos: Nanos; promptTokens: number } {
    const promptTokens = estimatePromptTokens(call.body);
    const completionTokens = reservedCompletionTokens(call.body, route.maxTokens);
    let amountNanos = 0n;
    for (const model of route.models) {
      const price = this.pricing.priceOf(model);
      const cost = tokensCost(promptTokens, price.prompt) + tokensCost(completionTokens, price.completion);
      if (cost > amountNanos) amountNanos = cost;
    }
    return { amountNanos, promptTokens };
  }

  /**
   * Holds the worst case on the caller's user and department budgets in one atomic statement.
   * Throws 402 `budget_exceeded` naming the scope that cannot cover it, or 503 `unavailable`
   * when the database cannot be asked: budgets fail closed, never into a free call.
   */
  async reserve(call: BudgetedCall, route: BudgetedRoute, cache: string | null = null): Promise<Reservation> {
    const { amountNanos, promptTokens } = this.worstCase(call, route);
    const now = this.clock.now();
    const starts = periodStarts(now);
    const id = randomUUID();
    const { principal } = call;
    let rows: ReserveRow[];
    try {
      rows = await this.dataSource.query<ReserveRow[]>(RESERVE_SQL, [
        principal.userId,
        principal.departmentId,
        amountNanos.toString(),
        now.toISOString(),
        starts.day.toISOString(),
        starts.week.toISOString(),
        starts.month.toISOString(),
        id,
        call.requestId,
      ]);
    } catch (cause) {
      this.logger.error({ reqId: call.requestId, err: (cause as Error).message }, 'budget reserve failed; refusing the request');
      throw new GatewayError('unavailable', 'Budgets cannot be checked right now (database unavailable), so the request was not sent upstream.', { cause });
    }
    const first = rows[0];
    if (!first) throw new GatewayError('unavailable', 'Budgets cannot be checked right now.');
    if (!first.ok) throw refusal(rows, amountNanos);
    return { id, requestId: call.requestId, principal, door: call.door, taskType: route.ruleTaskType, cache, amountNanos, promptTokens };
  }

  /**
   * Charges what the attempts cost, releases the rest of the reservation and writes one ledger
   * row per attempt, in one statement. A release after a failure is the same call: failed
   * attempts without usage cost 0. Returns the total charged.
   *
   * Never throws: the upstream has answered (and billed) by now, so a database failure here must
   * not turn a delivered answer into an error. It is logged loudly; the reservation then stays
   * held until the sweeper releases it, so the budget errs on the side of refusing.
   */
  async settle(reservation: Reservation, attempts: readonly ChargedAttempt[], options: SettleOptions = {}): Promise<Nanos> {
    const lines = attempts.map((attempt, index) => this.charge(attempt, index, index === attempts.length - 1 ? options.producedChars : undefined, reservation));
    let total = 0n;
    for (const line of lines) total += BigInt(line.cost_nanos);
    const now = this.clock.now();
    const starts = periodStarts(now);
    const { principal } = reservation;
    try {
      await this.dataSource.query(SETTLE_SQL, [
        reservation.id,
        principal.userId,
        principal.departmentId,
        now.toISOString(),
        starts.day.toISOString(),
        starts.week.toISOString(),
        starts.month.toISOString(),
        reservation.requestId,
        principal.keyId,
        reservation.cache,
        reservation.taskType,
        reservation.door,
        JSON.stringify(lines),
      ]);
    } catch (error) {
      this.logger.error(
        { reqId: reservation.requestId, user: principal.userId, costUsd: formatUsd(total), attempts: lines.length, err: (error as Error).message },
        'budget settle failed: cost not recorded; the reservation stays held until the sweeper releases it',
      );
    }
    return total;
  }

  /** A cache hit is free but still a ledger row, so usage reports count every answer. */
  async recordCacheHit(call: BudgetedCall, route: Pick<BudgetedRoute, 'ruleTaskType'>, model: string, usage?: Usage): Promise<void> {
    const { principal } = call;
    try {
      await this.dataSource.query(CACHE_HIT_SQL, [
        call.requestId,
        principal.keyId,
        principal.userId,
        principal.departmentId,
        model,
        tokenCount(usage?.prompt_tokens),
        tokenCount(usage?.completion_tokens),
        route.ruleTaskType,
        call.door,
        this.clock.now().toISOString(),
      ]);
    } catch (error) {
      this.logger.error({ reqId: call.requestId, err: (error as Error).message }, 'ledger row for a cache hit not written');
    }
  }

  private charge(attempt: ChargedAttempt, index: number, producedChars: number | undefined, reservation: Reservation): LedgerLine {
    const price = this.pricing.priceOf(attempt.model);
    const base = { attempt: index, model: attempt.model, status: attempt.status ?? null, outcome: attempt.ok ? 'ok' : (attempt.failure ?? 'failed') };
    if (attempt.usage) {
      const cost = costOf(attempt.usage, price);
      const source: CostSource = cost.source === 'pricing_table' && price.source === 'fallback' ? 'fallback_price' : cost.source;
      return {
        ...base,
        prompt_tokens: tokenCount(attempt.usage.prompt_tokens),
        completion_tokens: tokenCount(attempt.usage.completion_tokens),
        cost_nanos: cost.nanos.toString(),
        cost_source: source,
      };
    }
    if (producedChars !== undefined) {
      // Output reached the client but the upstream never said what it cost (a cut stream):
      // charge the prompt estimate plus what was produced, at this model's price.
      const prompt = reservation.promptTokens;
      const completion = producedTokens(producedChars);
      const cost = costOf({ prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }, price);
      return {
        ...base,
        prompt_tokens: tokenCount(prompt),
        completion_tokens: tokenCount(completion),
        cost_nanos: cost.nanos.toString(),
        cost_source: 'estimate',
      };
    }
    return { ...base, prompt_tokens: 0, completion_tokens: 0, cost_nanos: '0', cost_source: 'none' };
  }
}

function tokenCount(value: number | undefined): number {
  if (value === undefined || !Number.isFinite(value) || value < 0) return 0;
  return Math.min(MAX_INT, Math.round(value));
}

function refusal(rows: ReserveRow[], amount: Nanos): GatewayError {
  const budgets = rows.filter(
    (
      r,
    ): r is ReserveRow & {
      scope: BudgetScope;
      limit_nanos: string;
      period: BudgetPeriod;
      period_start: Date | string;
      spent_nanos: string;
      reserved_nanos: string;
    } => r.scope !== null,
  );
  const over = budgets.filter((r) => BigInt(r.spent_nanos) + BigInt(r.reserved_nanos) + amount > BigInt(r.limit_nanos));
  const row = over.find((r) => r.scope === 'user') ?? over[0] ?? budgets[0];
  if (!row) return new GatewayError('budget_exceeded', 'The budget cannot cover this request.');
  const limit = BigInt(row.limit_nanos);
  const left = limit - BigInt(row.spent_nanos) - BigInt(row.reserved_nanos);
  const resetsAt = nextReset(row.period, new Date(row.period_start));
  const who = row.scope === 'user' ? 'User' : 'Department';
  const when = resetsAt ? `It resets at ${resetsAt.toISOString()}.` : 'A total budget does not reset.';
  return new GatewayError(
    'budget_exceeded',
    `${who} budget exceeded: this request may cost up to $${formatUsd(amount)}, but only $${formatUsd(left > 0n ? left : 0n)} of the ${row.period} $${formatUsd(limit)} ${row.scope} budget is left. ${when}`,
    { param: row.scope, details: { resets_at: resetsAt?.toISOString() ?? null } },
  );
}
