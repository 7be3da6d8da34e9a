import type { Logger } from 'pino';
import type { ReadinessReport } from '../health/readiness.js';
import { LogThrottle } from './log-throttle.js';

export interface BatchWriterOptions<T> {
  /**
   * Stores the front of the buffer and resolves with how many of its leading items are done
   * with (stored, or set aside by the caller); 0 means "try again at once with what is left"
   * (the caller changed how much it takes). Throwing counts as a failed flush: every item stays
   * buffered and is retried after a backoff.
   */
  store(batch: readonly T[]): Promise<number>;
  /** Items per store() call; a buffer this full starts a drain at once. */
  batchSize: number;
  /** A drain starts at least this often while items wait (and the timer runs). */
  flushMs: number;
  /** Longest wait between failed flushes. */
  maxBackoffMs: number;
  logger: Logger;
  messages: { failed: string; stillFailing: string; recovered: string };
  /** Runs before each batch is taken (may add() items). */
  beforeBatch?: () => void;
  /** Runs when a drain got through everything it meant to write. */
  drained?: () => void;
  /** Runs on each failed flush, before it is logged. */
  failed?: (error: unknown) => void;
  /** The error as readiness and logs show it. */
  describeError?: (error: unknown) => string;
}

const SHUTDOWN_ATTEMPTS = 3;
const SHUTDOWN_ROUNDS = 200;
const SHUTDOWN_MAX_WAIT_MS = 1000;

/**
 * The machinery behind a writer that keeps rows off the request path: an in-memory buffer
 * stored in batches by one drain at a time (on a timer, or at once when a batch is full), with
 * exponential backoff plus jitter while the database refuses, rate-limited loud logs, a
 * readiness report and a drain on shutdown. What is stored, and how, stays with its owner.
 */
export class BatchWriter<T> {
  /** Items stay here until done with: new ones are only appended behind them. */
  readonly buffer: T[] = [];
  private running: Promise<void> | undefined;
  private scheduled = false;
  private timer: NodeJS.Timeout | undefined;
  private failureCount = 0;
  private nextAttemptAt = 0;
  private error: string | undefined;
  /** Set when the shutdown drain is over: nothing is stored after it. */
  private closedForGood = false;
  private readonly loudLogs = new LogThrottle();
  /** Items ever added, and ever done with: a flush waits for a count. */
  private added = 0;
  private done = 0;

  constructor(private readonly options: BatchWriterOptions<T>) {}

  get size(): number {
    return this.buffer.length;
  }

  /** Consecutive failed flushes; 0 once a store succeeds. */
  get failures(): number {
    return this.failureCount;
  }

  get lastError(): string | undefined {
    return this.error;
  }

  get started(): boolean {
    return this.timer !== undefined;
  }

  /** The shutdown drain is over: nothing added from now on is stored (the owner reports it lost). */
  get finished(): boolean {
    return this.closedForGood;
  }

  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.tick(), this.options.flushMs);
    // The timer alone must never keep a process alive; shutdown drains explicitly.
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Buffers one item. Never throws and never waits: a full batch is stored on a later turn. */
  add(item: T): void {
    this.buffer.push(item);
    this.added += 1;
    if (this.buffer.length >= this.options.batchSize && !this.running && !this.scheduled && Date.now() >= this.nextAttemptAt) {
      // Deferred: even the synchronous start of a query does not belong on the request path.
      this.scheduled = true;
      setImmediate(() => {
        this.scheduled = false;
        // A flush that failed meanwhile set a backoff; the timer picks the batch up after it.
        if (Date.now() >= this.nextAttemptAt) void this.runDrain();
      });
    }
  }

  /**
   * Stores everything added before this call (later items may ride along), ignoring the backoff
   * once. Resolves false if the database refused; never throws.
   */
  async flush(): Promise<boolean> {
    const target = this.added;
    let tried = false;
    while (this.done < target) {
      if (this.running) {
        await this.running;
        continue;
      }
      if (tried) return false;
      tried = true;
      this.nextAttemptAt = 0;
      await this.runDrain();
    }
    return true;
  }

  /**
   * For shutdown: stores until the buffer is empty. Requests still finishing record more while a
   * flush runs, so a flush that stored everything before it is followed by another for what came
   * meanwhile (a bounded number of rounds: under endless traffic the owner's next drain takes the
   * rest). A database that refuses is tried again, a little apart, until `deadline` (epoch ms):
   * it may be back in a moment, and what is still here when the process exits is lost. No
   * attempt runs past `deadline`: one the database does not answer (frozen, partitioned) would
   * otherwise wait for the pool's connect or query timeout, 5 or 35 s per attempt, and keep the
   * process past its grace period. Without a deadline, SHUTDOWN_ATTEMPTS attempts, each as long
   * as it takes. False when it still refused; what is left is the owner's to report (`size`).
   * It is the last: the writer stores nothing after it.
   */
  async drainForShutdown(deadline?: number): Promise<boolean> {
    try {
      let refused = 0;
      for (let round = 0; round < SHUTDOWN_ROUNDS && this.buffer.length > 0; round += 1) {
        if (await this.flushBefore(deadline)) continue;
        refused += 1;
        const wait = Math.min(SHUTDOWN_MAX_WAIT_MS, 100 * refused);
        if (deadline === undefined ? refused >= SHUTDOWN_ATTEMPTS : Date.now() + wait >= deadline) return false;
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
      return this.buffer.length === 0 || refused === 0;
    } finally {
      this.closedForGood = true;
    }
  }

  report(details: Record<string, unknown>): ReadinessReport {
    if (this.failureCount === 0) return { state: 'up', details };
    return { state: 'degraded', details: { ...details, failing: true, consecutive_failures: this.failureCount, last_error: this.error } };
  }

  /** Loud but bounded: one line per kind per interval, not one per request. */
  loud(kind: string, log: () => void): void {
    if (this.loudLogs.admit(kind) !== undefined) log();
  }

  /**
   * flush(), given up on at `deadline`. The store it waits for goes on (a statement cannot be
   * taken back from here); its pool is its owner's to close.
   */
  private async flushBefore(deadline: number | undefined): Promise<boolean> {
    if (deadline === undefined) return this.flush();
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), Math.max(0, deadline - Date.now()));
    });
    try {
      const stored = await Promise.race([this.flush(), late]);
      // The owner's lost-report says why: no store failed, none answered.
      if (!stored && this.error === undefined) this.error = 'the database did not answer before the shutdown deadline';
      return stored;
    } finally {
      clearTimeout(timer);
    }
  }

  private tick(): void {
    if (this.running || this.buffer.length === 0 || Date.now() < this.nextAttemptAt) return;
    void this.runDrain();
  }

  private runDrain(): Promise<void> {
    // The owner closes its pool after the shutdown drain: a flush given up on at the deadline
    // would otherwise go on retrying against it ("Cannot use a pool after calling end on the
    // pool"), logged after the owner reported the rest lost.
    if (this.closedForGood && !this.running) return Promise.resolve();
    // Started a microtask later so that `running` is already set when beforeBatch add()s.
    this.running ??= Promise.resolve()
      .then(() => this.drain())
      .finally(() => {
        this.running = undefined;
      });
    return this.running;
  }

  /**
   * Writes what waited when the drain started, and no more: what arrives meanwhile waits for the
   * timer (or starts a drain of its own once it fills a batch). Writing "until the buffer is
   * empty" instead meant, under steady traffic, one tiny transaction after another, each with
   * the few items that came in during the last one: the audit writer committed every ~3 ms with
   * 2-3 events (5 round trips each), a fifth of a cache hit's CPU at one connection. It also
   * keeps a flush() from waiting on traffic that keeps coming.
   */
  private async drain(): Promise<void> {
    let remaining = this.buffer.length;
    while (remaining > 0) {
      this.options.beforeBatch?.();
      const batch = this.buffer.slice(0, Math.min(this.options.batchSize, remaining));
      if (batch.length === 0) break;
      let stored: number;
      try {
        stored = await this.options.store(batch);
      } catch (error) {
        this.failed(error);
        return;
      }
      this.buffer.splice(0, stored);
      remaining -= stored;
      this.done += stored;
      if (this.failureCount > 0) this.options.logger.warn({ failures: this.failureCount, buffered: this.buffer.length }, this.options.messages.recovered);
      this.failureCount = 0;
      this.error = undefined;
      this.nextAttemptAt = 0;
    }
    this.options.drained?.();
    // What arrived during the drain is the next one's; a full batch should not wait for the timer.
    if (this.buffer.length >= this.options.batchSize && this.timer) setImmediate(() => this.tick());
  }

  private failed(error: unknown): void {
    this.failureCount += 1;
    this.error = this.options.describeError ? this.options.describeError(error) : (error instanceof Error ? error.message : String(error)).slice(0, 200);
    this.options.failed?.(error);
    const backoff = Math.min(this.options.maxBackoffMs, this.options.flushMs * 2 ** Math.min(this.failureCount, 20));
    // Jitter: instances that lost the database together should not all come back at once.
    this.nextAttemptAt = Date.now() + backoff / 2 + Math.random() * (backoff / 2);
    const entry = { err: this.error, failures: this.failureCount, buffered: this.buffer.length, retryInMs: Math.round(this.nextAttemptAt - Date.now()) };
    if (this.failureCount === 1) this.options.logger.error(entry, this.options.messages.failed);
    else this.loud('failing', () => this.options.logger.error(entry, this.options.messages.stillFailing));
  }
}
