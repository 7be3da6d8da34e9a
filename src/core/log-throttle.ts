/**
 * Loud but bounded logging: one line per key per interval, however often the thing happens,
 * with how many times it happened in between. What an outage makes every request or every retry
 * say (a dependency down, a writer failing) would otherwise flood the log with one line each.
 */
export class LogThrottle {
  private readonly seen = new Map<string, { loggedAt: number; more: number }>();

  constructor(
    private readonly intervalMs = 10_000,
    private readonly now: () => number = () => Date.now(),
  ) {}

  /** How many like it went unlogged since the key's last line, or undefined to skip this one. */
  admit(key: string): number | undefined {
    const now = this.now();
    const entry = this.seen.get(key);
    if (entry && now - entry.loggedAt < this.intervalMs) {
      entry.more += 1;
      return undefined;
    }
    const more = entry?.more ?? 0;
    this.seen.set(key, { loggedAt: now, more: 0 });
    return more;
  }

  /** The condition is over: the next occurrence is logged at once. */
  reset(key: string): void {
    this.seen.delete(key);
  }
}
