import type { Logger } from 'pino';

/**
 * Tracks whether a Redis-backed feature is running on its fallback, and logs each change of
 * state once (not once per request): an outage under load would otherwise flood the log.
 */
export class FallbackState {
  private degradedSince: number | undefined;
  private lastError: string | undefined;

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

  ok(): void {
    if (this.degradedSince === undefined) return;
    this.logger.info({ degradedMs: Date.now() - this.degradedSince }, this.messages.recovered);
    this.degradedSince = undefined;
    this.lastError = undefined;
  }
}
