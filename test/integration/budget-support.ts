import { DataSource } from 'typeorm';
import { parseUsd } from '../../libs/money/src/index.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import type { Principal } from '../../src/identity/principal.js';
import type { TestGateway } from '../support/gateway.js';

/** Reads budgets and the ledger straight from the database the gateway uses (PGlite or PostgreSQL). */
export function dataSourceOf(gw: TestGateway): DataSource {
  return gw.gateway.app.get(DataSource);
}

/** How a helper reads: after storing this instance's queued settles (what its budget views do), or as the database holds it now. */
export interface ReadOptions {
  /** Default true. false: read what is stored now (other instances, or the writer's own timer, still on the way). */
  flush?: boolean;
}

/** Stores the settles and cache-hit ledger rows this instance has queued; fails the test if the database refused. */
export async function flushBudgets(gw: TestGateway): Promise<void> {
  if (!(await gw.gateway.app.get(BudgetService).flush())) throw new Error('budget flush failed');
}

async function before(gw: TestGateway, options: ReadOptions): Promise<void> {
  if (options.flush !== false) await flushBudgets(gw);
}

export interface StoredBudget {
  limit: bigint;
  spent: bigint;
  reserved: bigint;
  periodStart: Date;
}

export async function storedBudget(gw: TestGateway, scope: 'user' | 'department', id: string, options: ReadOptions = {}): Promise<StoredBudget> {
  await before(gw, options);
  const rows = await dataSourceOf(gw).query<
    Array<{
      limit_nanos: string;
      spent_nanos: string;
      reserved_nanos: string;
      period_start: Date | string;
    }>
  >('SELECT limit_nanos, spent_nanos, reserved_nanos, period_start FROM budgets WHERE scope = $1 AND scope_id = $2', [scope, id]);
  const row = rows[0];
  if (!row) throw new Error(`no ${scope} budget for ${id}`);
  return { limit: BigInt(row.limit_nanos), spent: BigInt(row.spent_nanos), reserved: BigInt(row.reserved_nanos), periodStart: new Date(row.period_start) };
}

export interface LedgerRow {
  charge_id: string | null;
  request_id: string;
  attempt: number;
  key_id: string | null;
  user_id: string;
  department_id: string;
  model: string;
  prompt_tokens: number;
  completion_tokens: number;
  cost_nanos: string;
  cost_source: string;
  status: number | null;
  outcome: string;
  cache: string | null;
  task_type: string | null;
  door: string;
  created_at: Date;
  /** How many cache hits the row counts; null on a charged call's row. */
  cache_hits: number | null;
}

export async function ledgerRows(gw: TestGateway, scope: 'user' | 'department', id: string, options: ReadOptions = {}): Promise<LedgerRow[]> {
  await before(gw, options);
  const column = scope === 'user' ? 'user_id' : 'department_id';
  const rows = await dataSourceOf(gw).query<LedgerRow[]>(`SELECT * FROM usage_ledger WHERE ${column} = $1 ORDER BY id`, [id]);
  return rows.map((r) => ({ ...r, attempt: Number(r.attempt), prompt_tokens: Number(r.prompt_tokens), completion_tokens: Number(r.completion_tokens) }));
}

/** Σ cost of the ledger rows of a scope since `from` (the budget's period start), exactly, as bigint. */
export async function ledgerSum(gw: TestGateway, scope: 'user' | 'department', id: string, from = new Date(0), options: ReadOptions = {}): Promise<bigint> {
  await before(gw, options);
  const column = scope === 'user' ? 'user_id' : 'department_id';
  const [row] = await dataSourceOf(gw).query<Array<{ total: string }>>(
    `SELECT COALESCE(sum(cost_nanos), 0)::bigint AS total FROM usage_ledger WHERE ${column} = $1 AND created_at >= $2`,
    [id, from.toISOString()],
  );
  return BigInt(row?.total ?? '0');
}

/** A user key's principal for a tenant, for tests that call BudgetService directly (no HTTP request). */
export function principalOf(t: { keyId: string; userId: string; departmentId: string }): Principal {
  return { keyId: t.keyId, keyPrefix: 'k', userId: t.userId, departmentId: t.departmentId, role: 'user', cacheScope: 'user', expiresAt: undefined };
}

/** The worst case the gateway reserves for `body` on a route of `models` capped at `maxTokens` (what "a budget that covers N" means). */
export function worstCaseNanos(gw: TestGateway, body: { messages: Array<{ role: string; content: string }> }, models: string[], maxTokens: number): bigint {
  const principal = principalOf({ keyId: 'k', userId: 'u', departmentId: 'd' });
  return gw.gateway.app.get(BudgetService).worstCase({ principal, requestId: 'estimate', door: 'chat', body }, { models, maxTokens, ruleTaskType: 'general' })
    .amountNanos;
}

/** The request the budget suites send: its worst case is the unit "a budget that covers N requests" is measured in. */
export const MODEL = 'openai/gpt-4o-mini';
export const MAX_TOKENS = 100;
export const BODY = { messages: [{ role: 'user', content: 'hi' }] };
export const REQUEST = { ...BODY, model: MODEL, max_tokens: MAX_TOKENS };
export const WEDNESDAY_NOON = '2026-01-07T12:00:00.000Z';
/** Identical requests would be answered by the response cache (free, no reservation): skip it. */
export const FRESH = { 'cache-control': 'no-cache, no-store' };

/** What the caller was told it was charged (x-gateway-cost-usd); -1 when the header is missing or malformed. */
export function costHeader(res: { headers: Headers }): bigint {
  return parseUsd(res.headers.get('x-gateway-cost-usd') ?? 'x') ?? -1n;
}

export interface HeldRow {
  request_id: string;
  user_nanos: string;
  department_nanos: string;
}

/** The reservation rows (requests in flight, budget leases) holding money on a user's budget now. */
export async function heldRows(gw: TestGateway, userId: string): Promise<HeldRow[]> {
  return dataSourceOf(gw).query<HeldRow[]>('SELECT request_id, user_nanos::text, department_nanos::text FROM budget_reservations WHERE user_id = $1', [userId]);
}
