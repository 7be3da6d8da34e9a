import type { Logger } from 'pino';

/**
 * Tracks whether a Redis-backed feature is running on its fallback, and logs each change of
 * state once (not once per request): an outage under load would otherwise flood the log.
 */
export class FallbackState {
  private degradedSince: number | undefined;
  private lastError: string | undefined;
  private checking = false;

  constructor(
    private readonly logger: Logger,
    private readonly messages: { degraded: string; recovered: string },
  ) {}

  get degraded(): boolean {
    return this.degradedSince !== undefined;
  }

  /** Details for /health/ready. */
  describe(): Record<string, unknown> {
    return this.degradedSince === undefined ? {} : { since: new Date(this.degradedSince).toISOString(), reason: this.lastError };
  }

  fail(reason: string): void {
    this.lastError = reason;
    if (this.degradedSince !== undefined) return;
    this.degradedSince = Date.now();
    this.logger.warn({ reason }, this.messages.degraded);
  }

  /**
   * While degraded: runs `probe` (one at a time) and recovers only if it succeeds. For a
   * readiness check on a connected client: being connected proves nothing about commands (a
   * primary demoted to a replica behind the same address, or one out of memory with noeviction,
   * keeps the connection and answers PING but refuses every write), and without traffic nothing
   * else would find out that Redis is back. The check itself reports this call's state: the
   * probe's outcome shows on the next one.
   */
  recheck(probe: () => Promise<unknown>): void {
    if (this.degradedSince === undefined || this.checking) return;
    this.checking = true;
    probe()
      .then(
        () => this.ok(),
        (error: unknown) => this.fail((error as Error).message),
      )
      .finally(() => (this.checking = false));
  }

  ok(): void {
    if (this.degradedSince === undefined) return;
    this.logger.info({ degradedMs: Date.now() - this.degradedSince }, this.messages.recovered);
    this.degradedSince = undefined;
    this.lastError = undefined;
  }
}
