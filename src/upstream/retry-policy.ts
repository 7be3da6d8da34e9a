import type { UpstreamRetryConfig } from '../config/config.js';
import type { UpstreamFailure } from './llm-client.js';

/** Randomness and waiting as dependencies, so the policy is testable without real time. */
export interface RetryEnv {
  /** Uniform in [0, 1). */
  random(): number;
  /** Resolves true after `ms`, or false as soon as `signal` aborts (never rejects). */
  sleep(ms: number, signal: AbortSignal): Promise<boolean>;
}

export const SYSTEM_RETRY_ENV: RetryEnv = {
  random: Math.random,
  sleep(ms, signal) {
    if (signal.aborted) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const onAbort = (): void => {
        clearTimeout(timer);
        resolve(false);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener('abort', onAbort);
        resolve(true);
      }, ms);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  },
};

/**
 * Exponential backoff with full jitter (a uniform wait in [0, min(max, base·2^(n-1))), which
 * spreads a crowd of retrying clients instead of moving the crowd a few seconds later), and the
 * upstream's own `retry-after`/`retry-after-ms` honoured up to a cap: the upstream knows when it
 * will have room, and a longer wait than the cap is better spent on the next model.
 */
export class RetryPolicy {
  constructor(
    readonly config: UpstreamRetryConfig,
    private readonly random: () => number = Math.random,
  ) {}

  /** Full-jitter backoff before retry number `retry` (1 = the first retry). */
  backoffMs(retry: number): number {
    const ceiling = Math.min(this.config.maxDelayMs, this.config.baseDelayMs * 2 ** Math.max(0, retry - 1));
    return Math.floor(this.random() * ceiling);
  }

  /**
   * The wait before retrying the same model after `failure`, or undefined when it should not be
   * retried (tries used up, or the upstream asks for a longer pause than we are willing to give).
   */
  delayBeforeRetry(tryNumber: number, failure: UpstreamFailure): number | undefined {
    if (tryNumber >= this.config.attemptsPerModel) return undefined;
    const backoff = this.backoffMs(tryNumber);
    const asked = failure.retryAfterMs;
    if (asked === undefined) return backoff;
    if (asked > this.config.retryAfterCapMs) return undefined;
    // Never earlier than asked; the jitter still spreads clients that were all told "1 second".
    return Math.max(asked, backoff);
  }
}
