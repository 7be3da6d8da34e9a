import type { Nanos } from '../../libs/money/src/index.js';
import type { ChatCompletionRequest, Usage } from '../../libs/openai-contract/src/index.js';
import type { Principal } from '../identity/principal.js';
import type { PriceEntry } from '../upstream/pricing/pricing.service.js';
import type { Lease } from './budget-leases.js';
import type { BudgetPeriod } from './periods.js';

export type BudgetScope = 'user' | 'department';
export const BUDGET_SCOPES: readonly BudgetScope[] = ['user', 'department'];

/** What the budget needs to know about a call (a `CompletionCall` fits as is). */
export interface BudgetedCall {
  principal: Principal;
  requestId: string;
  door: string;
  body: ChatCompletionRequest;
}

/** The routing decision the worst case is computed from (a `ResolvedRoute` fits as is). */
export interface BudgetedRoute {
  models: readonly string[];
  maxTokens: number;
  ruleTaskType: string;
}

/** An amount held on the user's and the department's budgets until `settle`. */
export interface Reservation {
  readonly id: string;
  readonly requestId: string;
  readonly principal: Principal;
  readonly door: string;
  readonly taskType: string;
  readonly cache: string | null;
  /** The worst case, held on each scope that has a budget (and recorded for one created meanwhile). */
  readonly amountNanos: Nanos;
  /** The prompt estimate, reused to charge a stream cut before the upstream reported usage. */
  readonly promptTokens: number;
  /** The completion tokens reserved for (the cap sent upstream × `n`): the most an estimate charges. */
  readonly completionTokens: number;
  /**
   * The chain's models and their prices when the call was admitted (parallel lists): tokens are
   * charged at these, so a price raised while the call runs cannot take it past the worst case it
   * was admitted for. Absent on a reservation made by hand (tests): today's prices then.
   */
  readonly models?: readonly string[];
  readonly prices?: readonly PriceEntry[];
  /** false when no reservation row was recorded (a free call, a draw on a lease): settle then has nothing to release. */
  readonly held?: boolean;
  /** Set when the worst case was drawn from this instance's lease instead of reserved in the database. */
  readonly lease?: Lease;
  /**
   * Held on top of the worst case before a retry or fallback (BudgetService.topUp): what the failed
   * attempts before it were charged, so the next attempt's worst case is still held. Undefined
   * unless a failed attempt reported usage.
   */
  topUps?: TopUp[];
}

/** One hold of `Reservation.topUps`: the charge of the failed attempt at index `attempt`, held like any reservation. */
export interface TopUp {
  readonly attempt: number;
  readonly amountNanos: Nanos;
  readonly id: string;
  readonly held: boolean;
  readonly lease?: Lease;
}

/** One upstream attempt as the ledger charges it (the pipeline's `Attempt` fits as is). */
export interface ChargedAttempt {
  model: string;
  ok: boolean;
  status: number | undefined;
  failure: string | undefined;
  usage: Usage | undefined;
}

/** What a settle charged: the cost, and the tokens it was charged for (usage, or the estimate of a call without). */
export interface Settlement {
  costNanos: Nanos;
  /** Counted by token rate limits, so a stream cut before its usage frame counts as it is charged. */
  tokens: number;
}

export interface SettleOptions {
  /**
   * The last attempt delivered output (a JSON answer, or a stream that opened): when it has no
   * usage (a cut stream, an upstream that reports none), it is charged for these UTF-8 bytes.
   */
  producedBytes?: number;
}

/** A budget as stored. bigint columns arrive from pg as strings. */
export interface BudgetRow {
  scope: BudgetScope;
  scope_id: string;
  limit_nanos: string;
  period: BudgetPeriod;
  period_start: Date | string;
  spent_nanos: string;
  reserved_nanos: string;
}

/** API.md's budget view, for the current period. */
export interface BudgetView {
  scope: BudgetScope;
  id: string;
  limit_usd: number;
  period: BudgetPeriod;
  spent_usd: number;
  reserved_usd: number;
  remaining_usd: number;
  period_start: string;
  /** Gateway extension: when the period rolls over (null for `total`). */
  resets_at: string | null;
}
