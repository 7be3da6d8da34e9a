import { randomUUID } from 'node:crypto';
import { type BeforeApplicationShutdown, Injectable, type OnApplicationShutdown, type OnModuleInit, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import { formatUsd, type Nanos, parseUsd, tokensCost } from '../../libs/money/src/index.js';
import { cleanUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { databaseStep } from '../core/deadline.js';
import { GatewayError } from '../core/errors.js';
import { isoTime } from '../core/iso-time.js';
import { AppLogger } from '../core/logger.js';
import { GatewayMetrics } from '../metrics/gateway-metrics.js';
import { costOf, type CostSource, requestFee } from '../upstream/pricing/pricing.js';
import { type PriceEntry, PricingService } from '../upstream/pricing/pricing.service.js';
import { BudgetDatabase, type BudgetStatement } from './budget-database.js';
import { BudgetLeases, type Lease } from './budget-leases.js';
import { RENEW_SQL, RESERVE_BATCH_SQL, RESERVE_SQL } from './budget-sql.js';
import { BudgetWriter, type LedgerEntry, type PendingRelease } from './budget-writer.js';
import type { BudgetedCall, BudgetedRoute, BudgetRow, BudgetScope, ChargedAttempt, Reservation, SettleOptions, Settlement, TopUp } from './budget.types.js';
import { estimatePrompt, producedTokens, reservedCompletionTokens, TOKENS_PER_IMAGE } from './estimate.js';
import { type BudgetPeriod, nextReset, periodOf, periodStarts } from './periods.js';

interface ReserveRow {
  ok: boolean;
  scope: BudgetScope | null;
  limit_nanos: string | null;
  period: BudgetPeriod | null;
  period_start: Date | string | null;
  spent_nanos: string | null;
  reserved_nanos: string | null;
  recorded: string | number;
}

/** What one attempt costs: the part of its ledger row the attempt decides. */
type AttemptCharge = Pick<LedgerEntry, 'model' | 'prompt_tokens' | 'completion_tokens' | 'cost_nanos' | 'cost_source' | 'status' | 'outcome'>;

const MAX_INT = 2_147_483_647;
const RESERVE: BudgetStatement = { name: 'gatehouse_budget_reserve', text: RESERVE_SQL };
const RESERVE_BATCH: BudgetStatement = { name: 'gatehouse_budget_reserve_batch', text: RESERVE_BATCH_SQL };
const RENEW: BudgetStatement = { name: 'gatehouse_budget_renew', text: RENEW_SQL };
const BUDGETS_OF: BudgetStatement = {
  name: 'gatehouse_budget_budgets_of',
  text: `SELECT scope, scope_id, limit_nanos, period, period_start, spent_nanos, reserved_nanos FROM budgets
          WHERE (scope = 'user' AND scope_id = $1::uuid) OR (scope = 'department' AND scope_id = $2::uuid)`,
};

/**
 * The longest this instance keeps a reservation alive (renewHeld). No call legitimately runs this
 * long; a reservation a bug never settled is then left to the sweeper instead of holding its
 * money until the process ends.
 */
export const MAX_RENEWED_MS = 24 * 3_600_000;

/** The request id a lease's reservation row carries: it belongs to no single request. */
const LEASE_REQUEST_ID = 'budget-lease';

/** A reservation waiting for the end of the event-loop turn, to go out with the others of that turn. */
interface QueuedReserve {
  userId: string;
  departmentId: string;
  requestId: string;
  amountNanos: Nanos;
  id: string;
  resolve: (rows: ReserveRow[]) => void;
  reject: (error: unknown) => void;
}

/**
 * The budget stages of the pipeline: reserve the worst case before the upstream call, settle
 * the actual cost after it (or release on failure), and the ledger row of a cache hit.
 *
 * Round trips on the request path: reserve = at most 1 statement (see budget-sql.ts), whether or
 * not budgets are set, and none while the pair's lease covers the request (budget-leases.ts).
 * Settles and cache-hit rows are only queued here; BudgetWriter stores many of them with one
 * statement, off the request path.
 */
@Injectable()
export class BudgetService implements OnModuleInit, BeforeApplicationShutdown, OnApplicationShutdown {
  private readonly logger: Logger;
  /** Reservations of the current event-loop turn; sent together at its end (setImmediate). */
  private queued: QueuedReserve[] = [];
  private readonly leases: BudgetLeases;
  /** Reservations whose statement failed, released once it can no longer commit (releaseFailed). */
  private readonly failedHolds = new Map<NodeJS.Timeout, PendingRelease[]>();
  private closing = false;
  /**
   * The reservation rows this instance holds (exact reservations of calls in flight, lease rows
   * not yet released), with when each was taken: renewed together every `renewEveryMs` so the
   * sweeper leaves them alone however long their call runs (renewHeld).
   */
  private readonly liveRows = new Map<string, number>();
  /** A quarter of BUDGET_RESERVATION_TTL_MS: three renewals may fail before a live row could be swept. */
  readonly renewEveryMs: number;
  private renewTimer: NodeJS.Timeout | undefined;
  private renewing: Promise<number> | undefined;
  /** DATABASE_REQUEST_TIMEOUT_MS: how long a request waits for the writer before it reads the budgets (flushForRequest). */
  private readonly requestTimeoutMs: number;

  constructor(
    private readonly database: BudgetDatabase,
    private readonly writer: BudgetWriter,
    private readonly pricing: PricingService,
    private readonly clock: Clock,
    config: AppConfig,
    appLogger: AppLogger,
    @Optional() private readonly metrics?: GatewayMetrics,
  ) {
    this.logger = appLogger.logger.child({ context: 'Budget' });
    this.renewEveryMs = Math.max(50, Math.floor(config.budget.reservationTtlMs / 4));
    this.requestTimeoutMs = config.databaseRequestTimeoutMs;
    this.leases = new BudgetLeases(
      config.budget.leaseMs,
      config.budget.leaseRequests,
      (lease, nanos) => {
        // The whole row goes: nothing of this instance holds it any more.
        if (nanos === undefined) this.liveRows.delete(lease.id);
        this.release([{ id: lease.id, userId: lease.userId, departmentId: lease.departmentId, nanos }]);
      },
      () => this.clock.now().getTime(),
    );
  }

  /**
   * Keeps this instance's reservations alive while their calls run: the sweeper releases rows
   * not renewed for BUDGET_RESERVATION_TTL_MS, so a stream that outlives it (a stream has no
   * total time limit once its first event is out) keeps holding its money, while the rows of a
   * dead instance, which nobody renews, are still released.
   */
  onModuleInit(): void {
    this.renewTimer = setInterval(() => void this.renewHeld(), this.renewEveryMs);
    // Must never keep a process (or a test run) alive on its own.
    this.renewTimer.unref();
  }

  /** After the HTTP drain: the calls this instance ran are over. */
  onApplicationShutdown(): void {
    if (this.renewTimer) clearInterval(this.renewTimer);
    this.renewTimer = undefined;
  }

  /**
   * Shutdown: no new leases, and the held headroom goes back with the writer's last flush (a
   * lease with requests still in flight is released by its last settle).
   */
  beforeApplicationShutdown(): void {
    this.leases.close();
    this.closing = true;
    // Released now, with the writer's last flush: a statement still able to commit after it is
    // left to the sweeper.
    for (const [timer, releases] of this.failedHolds) {
      clearTimeout(timer);
      this.release(releases);
    }
    this.failedHolds.clear();
  }

  /**
   * The most a call can cost: the prompt estimate at the prompt price plus the completion cap
   * (× `n`) at the completion price, for the most expensive model the chain may fall back to;
   * each image at the model's published per-image price where that is more than the estimate's
   * allowance (TOKENS_PER_IMAGE), and the model's per-request fee.
   */
  worstCase(
    call: BudgetedCall,
    route: BudgetedRoute,
  ): { amountNanos: Nanos; promptTokens: number; completionTokens: number; prices: PriceEntry[] } {
    const { tokens: promptTokens, images } = estimatePrompt(call.body);
    const completionTokens = reservedCompletionTokens(call.body, route.maxTokens);
    let amountNanos = 0n;
    const prices: PriceEntry[] = [];
    for (const model of route.models) {
      const price = this.pricing.priceOf(model);
      prices.push(price);
      let cost = tokensCost(promptTokens, price.prompt) + tokensCost(completionTokens, price.completion) + requestFee(price);
      if (images > 0 && price.image !== undefined) {
        const perImage = parseUsd(price.image) ?? 0n;
        const allowed = tokensCost(TOKENS_PER_IMAGE, price.prompt);
        if (perImage > allowed) cost += BigInt(images) * (perImage - allowed);
      }
      if (cost > amountNanos) amountNanos = cost;
    }
    return { amountNanos, promptTokens, completionTokens, prices };
  }

  /**
   * Holds the worst case on the caller's user and department budgets in one atomic statement.
   * Throws 402 `budget_exceeded` naming the scope that cannot cover it, or 503 `unavailable`
   * when the database cannot be asked: budgets fail closed, never into a free call.
   *
   * A refusal while settles of this user or department still wait in this instance's writer is
   * checked once more after storing them: their reservations still hold each finished request's
   * worst case, which must not refuse a caller whose own earlier requests are long done.
   */
  async reserve(call: BudgetedCall, route: BudgetedRoute, cache: string | null = null): Promise<Reservation> {
    const { amountNanos, promptTokens, completionTokens, prices } = this.worstCase(call, route);
    const { principal } = call;
    this.writer.assertAccepting();
    const reservation = {
      requestId: call.requestId,
      principal,
      door: call.door,
      taskType: route.ruleTaskType,
      cache,
      amountNanos,
      promptTokens,
      completionTokens,
      models: route.models,
      prices,
    };
    return this.hold(reservation, principal.userId, principal.departmentId, call.requestId, amountNanos, amountNanos, call.door !== 'job');
  }

  /**
   * Before a retry or fallback that follows failed attempts which reported usage (an upstream
   * bills a failure mid-generation): holds what they are charged on top of the reservation, with
   * reserve's own machinery (a draw on the pair's lease, else an exact reservation, all or nothing
   * on user and department), so the next attempt's worst case is still held; the reservation only
   * held one attempt's. false when the budget refuses it (or cannot be asked): the call then ends
   * with the failure it has, charged what it used. Never on a call whose first attempt succeeds.
   */
  async topUp(reservation: Reservation, attempts: readonly ChargedAttempt[]): Promise<boolean> {
    const topUps = (reservation.topUps ??= []);
    // Every earlier charged attempt has its hold: a refused one ended the call.
    const covered = topUps.at(-1)?.attempt ?? -1;
    let held = heldBy(reservation);
    let charged = 0n;
    for (const [index, attempt] of attempts.entries()) {
      // As settle will charge it: the same cap (one worst case), whatever was held since.
      const cost = BigInt(this.charge(attempt, undefined, reservation, charged, held).cost_nanos);
      charged += cost;
      if (index <= covered || cost === 0n) continue;
      const { userId, departmentId } = reservation.principal;
      try {
        this.writer.assertAccepting();
        // A lease asked for here is sized on the call's worst case, as reserve's would be.
        topUps.push(
          await this.hold({ attempt: index, amountNanos: cost }, userId, departmentId, reservation.requestId, cost, reservation.amountNanos, reservation.door !== 'job'),
        );
      } catch (error) {
        this.logger.info({ reqId: reservation.requestId, err: (error as Error).message }, 'the budget cannot hold another attempt; not retrying');
        return false;
      }
      held += cost;
    }
    return true;
  }

  /**
   * Holds `amountNanos` for `base` (a reservation, or a top-up of one): a draw on the pair's lease
   * (one asked for is `perRequest` × BUDGET_LEASE_REQUESTS), else one exact reservation. A job's
   * try (`leased` false) always holds exactly, under its own request id: a worker that dies
   * mid-try leaves a hold its job's next try can tell apart from the budget being spent
   * (JobProcessor waits for the sweep then), where a lease's would only show as a 402. A job is
   * not waited on by a caller, so the statement it pays for costs no one latency.
   */
  private async hold<B>(
    base: B,
    userId: string,
    departmentId: string,
    requestId: string,
    amountNanos: Nanos,
    perRequest: Nanos,
    leased: boolean,
  ): Promise<B & { id: string; held: boolean; lease?: Lease }> {
    if (leased && amountNanos > 0n) {
      const lease = await this.leases.drawOrAsk(userId, departmentId, amountNanos, () => this.askLease(userId, departmentId, amountNanos, perRequest));
      if (lease) {
        this.metrics?.budgetHold('lease', 'granted');
        return { ...base, id: randomUUID(), held: false, lease };
      }
    }
    const id = randomUUID();
    let rows = await this.tryReserve(userId, departmentId, requestId, amountNanos, id);
    // Finished requests still hold their worst case until stored, and idle leases of this instance
    // hold headroom: give both back and ask once more.
    if (!rows[0]?.ok && (this.leases.releaseIdleFor(userId, departmentId) || this.writer.holdsPendingFor(userId, departmentId))) {
      // Bounded like the reserve itself; a refused store (false) still asks again: the second
      // reserve decides, at worst refusing as the first did.
      await this.bounded(this.writer.flush());
      // The refused attempt recorded nothing, so the id is still free.
      rows = await this.tryReserve(userId, departmentId, requestId, amountNanos, id);
    }
    const first = rows[0];
    if (!first) throw new GatewayError('unavailable', 'Budgets cannot be checked right now.');
    this.metrics?.budgetHold('exact', first.ok ? 'granted' : 'refused');
    if (!first.ok) throw refusal(rows, amountNanos);
    const held = Number(first.recorded) > 0;
    if (held) this.liveRows.set(id, this.clock.nowMs());
    return { ...base, id, held };
  }

  /**
   * Read-only, for a call that runs later (an async submit): the 402 `reserve` would answer when
   * what a budget has left after this period's spend cannot cover the call's worst case. Holds
   * are not counted: calls in flight and leases give theirs back within seconds, before a queued
   * job runs, and its try then reserves as any call does. Reserves and charges nothing.
   */
  async assertAffordable(call: BudgetedCall, route: BudgetedRoute): Promise<void> {
    const { amountNanos } = this.worstCase(call, route);
    const { userId, departmentId } = call.principal;
    // The caller's calls this instance just answered are spent, only not stored yet: read without
    // them, the budgets would look fuller than they are. A writer that cannot store them within
    // DATABASE_REQUEST_TIMEOUT_MS (the database not answering, or refusing writes) refuses the
    // submit (503, safe: nothing was queued), never waits for as long as the database is stuck.
    if (this.writer.holdsPendingFor(userId, departmentId) && !(await this.bounded(this.writer.flush()))) throw budgetsUnavailable();
    let budgets: BudgetRow[];
    try {
      budgets = await this.database.hold<BudgetRow>(BUDGETS_OF, [userId, departmentId]);
    } catch (cause) {
      throw budgetsUnavailable(cause);
    }
    const starts = periodStarts(this.clock.now());
    const rows = budgets.map((b): ReserveRow => {
      const { start, rolled } = periodOf(b.period, starts, new Date(b.period_start));
      const spent = rolled ? '0' : b.spent_nanos;
      return {
        ok: false,
        scope: b.scope,
        limit_nanos: b.limit_nanos,
        period: b.period,
        period_start: start,
        spent_nanos: spent,
        reserved_nanos: '0',
        recorded: 0,
      };
    });
    if (rows.some((r) => BigInt(r.spent_nanos ?? 0) + amountNanos > BigInt(r.limit_nanos ?? 0))) throw refusal(rows, amountNanos);
  }

  /**
   * Asks for a lease of `BUDGET_LEASE_REQUESTS` worst cases (`perRequest`) for this pair; the
   * asking request draws `amountNanos` from what it gets. A refusal is not an error here: the
   * request then reserves exactly.
   * A database that cannot be asked is (503), for this request and for those that waited on it.
   */
  private async askLease(userId: string, departmentId: string, amountNanos: Nanos, perRequest: Nanos): Promise<Lease | undefined> {
    const size = perRequest * BigInt(this.leases.requests);
    const id = randomUUID();
    let rows: ReserveRow[];
    try {
      rows = await this.tryReserve(userId, departmentId, LEASE_REQUEST_ID, size, id);
    } catch (error) {
      // The database cannot be asked: an exact reservation now would only wait as long again.
      this.leases.refused(userId, departmentId);
      throw error;
    }
    const first = rows[0];
    // A lease is only as good as its row: the row is what a budget created meanwhile counts.
    const granted = first?.ok === true && Number(first.recorded) > 0;
    this.metrics?.budgetHold('lease_request', granted ? 'granted' : 'refused');
    if (!granted) {
      this.leases.refused(userId, departmentId);
      return undefined;
    }
    this.liveRows.set(id, this.clock.nowMs());
    return this.leases.granted(id, userId, departmentId, size, amountNanos);
  }

  /**
   * Charges what the attempts cost, releases the rest of the reservation (its top-ups included)
   * and writes one ledger row per attempt. A release after a failure is the same call: failed
   * attempts without usage cost 0. Returns the total charged and the tokens it was charged for.
   * Call it once per reservation.
   *
   * Synchronous: the charge is queued for BudgetWriter, which stores it within BUDGET_FLUSH_MS
   * (one statement for many requests, retried while the database is away), so it never fails
   * or slows a delivered answer. Until then the reservation keeps holding the worst case.
   */
  settle(reservation: Reservation, attempts: readonly ChargedAttempt[], options: SettleOptions = {}): Settlement {
    const { principal } = reservation;
    const createdAt = isoTime(this.clock.nowMs());
    const topUps = reservation.topUps;
    const held = topUps === undefined ? reservation.amountNanos : heldBy(reservation);
    let total = 0n;
    let tokens = 0;
    const rows = attempts.map((attempt, index): LedgerEntry => {
      const charge = this.charge(attempt, index === attempts.length - 1 ? options.producedBytes : undefined, reservation, total, held);
      total += BigInt(charge.cost_nanos);
      tokens += charge.prompt_tokens + charge.completion_tokens;
      return {
        ...charge,
        charge_id: reservation.id,
        request_id: reservation.requestId,
        attempt: index,
        key_id: principal.keyId,
        user_id: principal.userId,
        department_id: principal.departmentId,
        cache: reservation.cache,
        task_type: reservation.taskType,
        door: reservation.door,
        created_at: createdAt,
        // An attempt a top-up was held for is charged to it: its cost is what the top-up holds.
        lease_id: (topUps?.find((t) => t.attempt === index) ?? reservation).lease?.id,
      };
    });
    // A draw on a lease holds nothing of its own: the lease gives its headroom back when retired.
    const release = reservation.held === false ? undefined : { id: reservation.id, userId: principal.userId, departmentId: principal.departmentId };
    this.liveRows.delete(reservation.id);
    this.writer.enqueue({ release, rows });
    const toppedUp = topUps === undefined ? 0n : this.settleTopUps(reservation, topUps, rows);
    if (reservation.lease) this.leases.settle(reservation.lease, reservation.amountNanos, total - toppedUp);
    return { costNanos: total, tokens };
  }

  /**
   * Releases a settled call's top-ups (queued after its charge, so no flush gives their headroom
   * back before that charge is in `spent`); returns what their attempts were charged.
   */
  private settleTopUps(reservation: Reservation, topUps: readonly TopUp[], rows: readonly LedgerEntry[]): Nanos {
    const { userId, departmentId } = reservation.principal;
    let charged = 0n;
    for (const topUp of topUps) {
      const cost = BigInt(rows[topUp.attempt]?.cost_nanos ?? 0);
      charged += cost;
      if (topUp.lease) this.leases.settle(topUp.lease, topUp.amountNanos, cost);
      if (!topUp.held) continue;
      this.liveRows.delete(topUp.id);
      this.writer.enqueue({ release: { id: topUp.id, userId, departmentId }, rows: [] });
    }
    return charged;
  }

  /** A cache hit is free but still counted in the ledger, so usage reports count every answer (BudgetWriter.recordCacheHit). */
  recordCacheHit(call: BudgetedCall, route: Pick<BudgetedRoute, 'ruleTaskType'>, model: string, usage?: Usage): void {
    const { principal } = call;
    this.writer.recordCacheHit({
      requestId: call.requestId,
      keyId: principal.keyId,
      userId: principal.userId,
      departmentId: principal.departmentId,
      model,
      taskType: route.ruleTaskType,
      door: call.door,
      promptTokens: tokenCount(usage?.prompt_tokens),
      completionTokens: tokenCount(usage?.completion_tokens),
      at: this.clock.now(),
    });
  }

  /**
   * Stores this instance's queued settles and ledger rows now, after giving back the headroom its
   * idle leases hold, so the numbers read next are exact for this instance (views, tests); false
   * if the database refused.
   */
  flush(): Promise<boolean> {
    this.leases.retireAll();
    return this.writer.flush();
  }

  /**
   * flush() for a request that reads the budgets or the ledger next (`GET /v1/usage`): waited for
   * at most DATABASE_REQUEST_TIMEOUT_MS, and 503 `unavailable` when the writer could not store
   * (the database not answering, or refusing writes), rather than an answer that leaves out the
   * caller's latest requests or one held for as long as the database is stuck.
   */
  async flushForRequest(): Promise<void> {
    if (!(await this.bounded(this.flush()))) throw budgetsUnavailable();
  }

  /** A wait on the database on a request's path, given up on (503) after DATABASE_REQUEST_TIMEOUT_MS; the work itself goes on. */
  private bounded<T>(work: Promise<T>): Promise<T> {
    return databaseStep(work, this.requestTimeoutMs, budgetsUnavailable);
  }

  /**
   * Renews every reservation row this instance still holds, in ONE statement (RENEW_SQL), off the
   * request path; nothing when it holds none. Runs every `renewEveryMs`; returns how many rows
   * were renewed. A failure (database away) is logged and the next interval tries again: a row
   * is swept only after BUDGET_RESERVATION_TTL_MS without a renewal, four intervals.
   */
  /** Whether this instance still renews a reservation's row (a settled one it must not). */
  renews(reservation: { id: string }): boolean {
    return this.liveRows.has(reservation.id);
  }

  renewHeld(): Promise<number> {
    this.renewing ??= this.renewOnce()
      .catch((error: unknown) => {
        this.logger.warn({ reservations: this.liveRows.size, err: (error as Error).message }, 'renewing budget reservations failed; will retry');
        return 0;
      })
      .finally(() => {
        this.renewing = undefined;
      });
    return this.renewing;
  }

  private async renewOnce(): Promise<number> {
    if (this.liveRows.size === 0) return 0;
    const now = this.clock.now();
    const ids: string[] = [];
    for (const [id, since] of this.liveRows) {
      if (now.getTime() - since <= MAX_RENEWED_MS) {
        ids.push(id);
        continue;
      }
      this.liveRows.delete(id);
      this.logger.error(
        { reservation: id, heldSince: new Date(since).toISOString() },
        'budget reservation held for a day was never settled; leaving it to the sweeper',
      );
    }
    if (ids.length === 0) return 0;
    const [row] = await this.database.hold<{ renewed: string | number }>(RENEW, [JSON.stringify(ids), now.toISOString()]);
    return Number(row?.renewed ?? 0);
  }

  /** A budget was set or removed: this instance's leases, taken under the old one, serve no new request. */
  retireLeases(): void {
    this.leases.retireAll();
  }

  /**
   * Requests whose cache lookups came back together (one Redis reply under load) reach this
   * stage in the same event-loop turn: their reservations leave together at the end of the turn,
   * as one statement (RESERVE_BATCH_SQL) instead of one round trip and one commit each. A turn
   * with a single reservation (one connection, light load) sends RESERVE_SQL as before, and
   * waits for nothing: setImmediate runs right after the current I/O callbacks.
   */
  private tryReserve(userId: string, departmentId: string, requestId: string, amountNanos: Nanos, id: string): Promise<ReserveRow[]> {
    return new Promise<ReserveRow[]>((resolve, reject) => {
      this.queued.push({ userId, departmentId, requestId, amountNanos, id, resolve, reject });
      if (this.queued.length === 1) setImmediate(() => void this.sendQueued());
    });
  }

  private async sendQueued(): Promise<void> {
    const batch = this.queued;
    this.queued = [];
    const now = this.clock.now();
    const starts = periodStarts(now);
    try {
      if (batch.length === 1) {
        const [only] = batch as [QueuedReserve];
        only.resolve(
          await this.database.hold<ReserveRow>(RESERVE, [
            only.userId,
            only.departmentId,
            only.amountNanos.toString(),
            now.toISOString(),
            starts.day.toISOString(),
            starts.week.toISOString(),
            starts.month.toISOString(),
            only.id,
            only.requestId,
          ]),
        );
        return;
      }
      const items = batch.map(({ userId, departmentId, requestId, amountNanos, id }) => ({
        id,
        request_id: requestId,
        user_id: userId,
        department_id: departmentId,
        amount: amountNanos.toString(),
      }));
      const rows = await this.database.hold<ReserveRow & { idx: number }>(RESERVE_BATCH, [
        JSON.stringify(items),
        now.toISOString(),
        starts.day.toISOString(),
        starts.week.toISOString(),
        starts.month.toISOString(),
      ]);
      const byItem = batch.map((): ReserveRow[] => []);
      for (const row of rows) byItem[row.idx - 1]?.push(row);
      batch.forEach((queued, i) => queued.resolve(byItem[i] ?? []));
    } catch (cause) {
      this.logger.error({ reservations: batch.length, err: (cause as Error).message }, 'budget reserve failed; refusing the requests');
      const error = new GatewayError('unavailable', 'Budgets cannot be checked right now (database unavailable), so the request was not sent upstream.', {
        cause,
      });
      for (const queued of batch) queued.reject(error);
      this.releaseFailed(batch);
    }
  }

  /**
   * A reserve statement that failed on our side may still have committed, or yet commit, on the
   * server's: we gave up (DATABASE_REQUEST_TIMEOUT_MS) while it waited on a row lock, or the
   * connection broke after its commit. Nothing would settle its holds, which would keep refusing
   * requests until the sweeper (BUDGET_RESERVATION_TTL_MS, 10 min). So every reservation of the
   * batch is released, once the statement can no longer commit (BudgetDatabase.holdSettleMs):
   * released earlier, the flush could pass before the commit and find nothing. One that never
   * became a row costs nothing: FLUSH_SQL's DELETE finds no row and takes nothing back.
   */
  private releaseFailed(batch: readonly QueuedReserve[]): void {
    const releases = batch.map(({ id, userId, departmentId }): PendingRelease => ({ id, userId, departmentId }));
    if (this.closing) {
      // The writer's last flush is near: a late release would find it stopped.
      this.release(releases);
      return;
    }
    const timer = setTimeout(() => {
      this.failedHolds.delete(timer);
      this.release(releases);
    }, this.database.holdSettleMs);
    timer.unref();
    this.failedHolds.set(timer, releases);
  }

  /** Queues releases with nothing charged: the writer frees what each reservation row holds. */
  private release(releases: readonly PendingRelease[]): void {
    for (const release of releases) this.writer.enqueue({ release, rows: [] });
  }

  /**
   * `charged`: what the call's earlier attempts cost, which an estimate must leave room for;
   * `held`: what the call holds, its worst case and its top-ups.
   */
  private charge(attempt: ChargedAttempt, producedBytes: number | undefined, reservation: Reservation, charged: Nanos, held: Nanos): AttemptCharge {
    // At the price the call was admitted at (its worst case was reckoned with it), not one an
    // override or the hourly /models refresh set while it ran: raised, that would take one admitted
    // call past its budget. The upstream's own usage.cost, what it billed, is taken as it is.
    const admitted = reservation.models?.indexOf(attempt.model) ?? -1;
    const price = (admitted >= 0 ? reservation.prices?.[admitted] : undefined) ?? this.pricing.priceOf(attempt.model);
    const base = { model: attempt.model, status: attempt.status ?? null, outcome: attempt.ok ? 'ok' : (attempt.failure ?? 'failed') };
    // Read once more: an attempt's usage is only as sound as whoever filled it in, and a settle runs
    // after the upstream answered, so it must not throw. Unusable usage is charged as missing usage.
    const usage = cleanUsage(attempt.usage);
    if (usage) {
      const cost = costOf(usage, price);
      const source: CostSource = cost.source === 'pricing_table' && price.source === 'fallback' ? 'fallback_price' : cost.source;
      // A failed attempt that reports usage (a 200 with an error mid-generation) is charged it, but
      // no more than one attempt's worst case, nor than the call holds beyond earlier charges: a
      // retry or fallback goes out only once topUp holds this charge on top of the reservation,
      // so the next attempt's worst case is still held and retries cannot take a budget past its limit.
      const room = held > charged ? held - charged : 0n;
      const cap = room < reservation.amountNanos ? room : reservation.amountNanos;
      const nanos = !attempt.ok && cost.nanos > cap ? cap : cost.nanos;
      return {
        ...base,
        prompt_tokens: tokenCount(usage.prompt_tokens),
        completion_tokens: tokenCount(usage.completion_tokens),
        cost_nanos: nanos.toString(),
        cost_source: source,
      };
    }
    if (producedBytes !== undefined) {
      // Output reached the client but the upstream never said what it cost (a cut stream):
      // charge the prompt estimate plus what was produced, at this model's price. UTF-8 bytes ÷ 3
      // is deliberately high (English runs ~4 per token), so a call cut near its cap came out
      // above the cap the upstream was sent, and above its reservation: one such stream spent a
      // budget 55% past its limit (test/integration/budget.int-spec.ts, cut streams). The upstream cannot produce more than the
      // cap, and a guess must not charge more than the worst case the call was admitted for (a
      // price raised since the reservation included).
      const prompt = reservation.promptTokens;
      const completion = Math.min(producedTokens(producedBytes), reservation.completionTokens);
      const cost = costOf({ prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }, price).nanos;
      const room = held > charged ? held - charged : 0n;
      return {
        ...base,
        prompt_tokens: tokenCount(prompt),
        completion_tokens: tokenCount(completion),
        cost_nanos: (cost < room ? cost : room).toString(),
        cost_source: 'estimate',
      };
    }
    return { ...base, prompt_tokens: 0, completion_tokens: 0, cost_nanos: '0', cost_source: 'none' };
  }
}

/** What a reservation holds: its worst case and its top-ups. */
function heldBy(reservation: Reservation): Nanos {
  let held = reservation.amountNanos;
  for (const topUp of reservation.topUps ?? []) held += topUp.amountNanos;
  return held;
}

function tokenCount(value: number | undefined): number {
  if (value === undefined || !Number.isFinite(value) || value < 0) return 0;
  return Math.min(MAX_INT, Math.round(value));
}

function budgetsUnavailable(cause?: unknown): GatewayError {
  return new GatewayError('unavailable', 'Budgets cannot be checked right now (database unavailable).', { cause });
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
