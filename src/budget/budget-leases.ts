import type { Nanos } from '../../libs/money/src/index.js';

/**
 * Budget headroom one instance holds for one user × department pair, drawn on by many requests.
 *
 * Why: an exact reservation is a PostgreSQL round trip on every request's path, the largest part
 * of what a cache miss adds at one connection and the one shared resource every instance of the
 * fleet contends on. A lease is an ordinary reservation (a `budget_reservations` row, taken by the
 * same atomic statement under the same all-or-nothing rule) of `BUDGET_LEASE_REQUESTS` worst
 * cases of the request that asks for it. Requests of the same pair then reserve their worst case
 * from it in memory, until it is used up or `BUDGET_LEASE_MS` has passed.
 *
 * Why it cannot overspend: a draw is granted only while the lease's own size covers the draws in
 * flight plus what finished draws were charged. A finished draw's ledger rows go through the
 * writer like any settle and name the lease: the flush adds their cost to `spent` and takes the
 * same amount off what the lease row (and `reserved`) holds, so the database never counts it
 * twice and other instances see exactly what is left. A lease retired (used up, expired, or
 * given back) gives back at once what its draws in flight cannot need: the writer shrinks its
 * row to their worst cases, so one long stream does not keep 32 of them held for its whole
 * length. The row is released (the writer deletes it, with what it still holds) once its last
 * draw has settled; a crashed instance's lease is released by the sweeper, as any reservation.
 *
 * Near the limit there are no leases: a lease of many worst cases does not fit, and that pair
 * reserves exactly, one statement per request, for the rest of the lease period. A pair with no
 * budget on either scope gets the same bounded lease with its row: a budget created while the
 * lease lives starts by holding what the row holds, so the lease's draws, in flight or still to
 * come on another instance, cannot spend it past what it counts. (An "unlimited" grant without a
 * row was invisible to a new budget, which was then charged for its draws on top of its limit.)
 *
 * What it changes for operators (src/budget/README.md): a budget set or lowered takes effect on
 * another instance within BUDGET_LEASE_MS; an idle lease of one user can refuse a request of
 * another user of the same department for that long when the department is nearly spent.
 */
export class Lease {
  /** Draws in flight, and the worst cases they hold. */
  draws = 0;
  outstanding: Nanos = 0n;
  /** What finished draws were charged: in `spent` (or on its way there), no longer free in the lease. */
  charged: Nanos = 0n;
  retired = false;
  released = false;

  constructor(
    /** Its budget_reservations row. */
    readonly id: string,
    readonly userId: string,
    readonly departmentId: string,
    /** What the row holds on each scope (counted by the scope's budget, when it has one). */
    readonly size: Nanos,
    readonly expiresAt: number,
  ) {}

  fits(amount: Nanos, now: number): boolean {
    if (this.retired || now >= this.expiresAt) return false;
    return this.charged + this.outstanding + amount <= this.size;
  }
}

const pairKey = (userId: string, departmentId: string): string => `${userId}/${departmentId}`;

/**
 * The shortest wait between two sweeps: each walks every lease, so on a busy instance leases
 * expiring a few milliseconds apart are swept together rather than one sweep each. An idle lease
 * is then given back at most this long after it expired.
 */
const SWEEP_GAP_MS = 25;

/**
 * This instance's leases, one current lease per pair (retired ones live on until their last draw
 * settles). BudgetService asks the database; this class only keeps the books.
 */
export class BudgetLeases {
  private readonly current = new Map<string, Lease>();
  /**
   * Pairs with a lease request on its way, and its outcome: their other requests wait for it and
   * draw from it rather than racing it with exact reservations (which, in a burst, would take the
   * headroom the lease needs and be refused what the lease then holds unused).
   */
  private readonly asking = new Map<string, Promise<Lease | undefined>>();
  /** Pairs refused a lease (near their limit): exact reservations until then. */
  private readonly exactUntil = new Map<string, number>();
  /** One timer, for the earliest expiry among current leases and exact periods (`timerAt`). */
  private timer: NodeJS.Timeout | undefined;
  private timerAt = Infinity;
  private closed = false;

  constructor(
    readonly leaseMs: number,
    /** Worst cases of the asking request a lease holds. */
    readonly requests: number,
    /**
     * Gives a retired lease's row back (queued for the budget writer): all of it, or, with
     * `nanos`, only that much of what it holds (the row stays, for the draws still in flight).
     */
    private readonly release: (lease: Lease, nanos?: Nanos) => void,
    private readonly now: () => number,
  ) {}

  get enabled(): boolean {
    return this.leaseMs > 0 && !this.closed;
  }

  /** Shutdown: no new leases; the current ones are retired (released now, or by their last draw). */
  close(): void {
    this.closed = true;
    this.retireAll();
    this.stop();
  }

  /** Reserves `amount` on the pair's current lease; undefined when it has none that covers it. */
  draw(userId: string, departmentId: string, amount: Nanos): Lease | undefined {
    const lease = this.current.get(pairKey(userId, departmentId));
    if (!lease) return undefined;
    if (!lease.fits(amount, this.now())) {
      // Used up or expired: the next request asks for a fresh one.
      this.retire(lease);
      return undefined;
    }
    lease.draws += 1;
    lease.outstanding += amount;
    return lease;
  }

  /**
   * A draw of `amount` from a lease for this pair: the current one, or the one being asked for,
   * or a new one asked for with `ask` (which resolves `granted` or `refused`). Undefined when the
   * pair reserves exactly: leases off, refused lately, or none covers the amount.
   */
  async drawOrAsk(userId: string, departmentId: string, amount: Nanos, ask: () => Promise<Lease | undefined>): Promise<Lease | undefined> {
    const drawn = this.draw(userId, departmentId, amount);
    if (drawn || !this.enabled) return drawn;
    const key = pairKey(userId, departmentId);
    const pending = this.asking.get(key);
    if (pending) {
      await pending;
      return this.draw(userId, departmentId, amount);
    }
    const until = this.exactUntil.get(key);
    if (until !== undefined) {
      if (this.now() < until) return undefined;
      this.exactUntil.delete(key);
    }
    const asked = ask().finally(() => this.asking.delete(key));
    this.asking.set(key, asked);
    return asked;
  }

  /** The database granted a lease of `size`; the asking request draws `amount` from it. */
  granted(id: string, userId: string, departmentId: string, size: Nanos, amount: Nanos): Lease {
    const key = pairKey(userId, departmentId);
    const lease = new Lease(id, userId, departmentId, size, this.now() + this.leaseMs);
    lease.draws = 1;
    lease.outstanding = amount;
    if (this.closed) {
      // Asked for before shutdown began: it serves its asking request, and goes back with its settle.
      this.retire(lease);
      return lease;
    }
    const previous = this.current.get(key);
    if (previous) this.retire(previous);
    this.current.set(key, lease);
    this.startTimer(lease.expiresAt);
    return lease;
  }

  /** The lease did not fit (or could not be asked for): this pair reserves exactly for a while. */
  refused(userId: string, departmentId: string): void {
    const until = this.now() + this.leaseMs;
    this.exactUntil.set(pairKey(userId, departmentId), until);
    this.startTimer(until);
  }

  /** A request that drew `amount` finished, charged `cost`. */
  settle(lease: Lease, amount: Nanos, cost: Nanos): void {
    lease.draws -= 1;
    lease.outstanding -= amount;
    lease.charged += cost;
    if (lease.retired) this.releaseIfIdle(lease);
  }

  /** Retires every lease (budget views, shutdown): idle ones are released at once, the others by their last draw. */
  retireAll(): void {
    for (const lease of [...this.current.values()]) this.retire(lease);
  }

  /**
   * A reservation on this user or department was refused: gives back the leases on them with
   * nothing in flight, and what expired ones do not need for their draws in flight (a lease
   * still drawn on and not expired keeps serving its pair). True when something was given back,
   * i.e. storing the writer's queue and asking again can succeed.
   */
  releaseIdleFor(userId: string, departmentId: string): boolean {
    const now = this.now();
    let released = false;
    for (const lease of [...this.current.values()]) {
      if (lease.userId !== userId && lease.departmentId !== departmentId) continue;
      if (lease.draws > 0 && now < lease.expiresAt) continue;
      if (this.retire(lease)) released = true;
    }
    return released;
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
  }

  /** True when the retired lease gave something back: its row, or what its draws in flight do not need. */
  private retire(lease: Lease): boolean {
    const first = !lease.retired;
    lease.retired = true;
    const key = pairKey(lease.userId, lease.departmentId);
    if (this.current.get(key) === lease) this.current.delete(key);
    if (this.releaseIfIdle(lease)) return true;
    // No draw can be added to a retired lease: beyond what its draws in flight hold and what
    // finished ones were charged (shrunk off the row by their own flush), nothing is needed.
    const unused = first ? lease.size - lease.charged - lease.outstanding : 0n;
    if (unused <= 0n) return false;
    this.release(lease, unused);
    return true;
  }

  private releaseIfIdle(lease: Lease): boolean {
    if (lease.draws > 0 || lease.released) return false;
    lease.released = true;
    this.release(lease);
    return true;
  }

  /**
   * Expired leases give their headroom back without waiting for traffic, each as it expires: an
   * interval of BUDGET_LEASE_MS started by an earlier lease swept a later one only at its next
   * tick, holding an idle lease's headroom up to twice as long.
   */
  private sweep(): void {
    this.timer = undefined;
    this.timerAt = Infinity;
    const now = this.now();
    let next = Infinity;
    for (const lease of [...this.current.values()]) {
      if (now >= lease.expiresAt) this.retire(lease);
      else if (lease.expiresAt < next) next = lease.expiresAt;
    }
    for (const [key, until] of this.exactUntil) {
      if (now >= until) this.exactUntil.delete(key);
      else if (until < next) next = until;
    }
    if (next !== Infinity) this.startTimer(next);
  }

  /** Arms the one timer for `at` unless it already fires earlier (leases are granted in time order: mostly a comparison). */
  private startTimer(at: number): void {
    if (this.closed || at >= this.timerAt) return;
    if (this.timer) clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => this.sweep(), Math.max(SWEEP_GAP_MS, at - this.now()));
    this.timer.unref();
  }
}
