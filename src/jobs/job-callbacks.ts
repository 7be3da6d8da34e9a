import { createHmac } from 'node:crypto';
import { Injectable, type OnApplicationShutdown } from '@nestjs/common';
import type { Logger } from 'pino';
import { type Agent, fetch } from 'undici';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { createCallbackAgent, refusedBy } from './callback-agent.js';
import { CallbackPolicy } from './callback-policy.js';
import { type JobRecord, jobView } from './job.types.js';

export const SIGNATURE_HEADER = 'x-gatehouse-signature';
export const TIMESTAMP_HEADER = 'x-gatehouse-timestamp';
const DELIVERY_TIMEOUT_MS = 10_000;
const DELIVERY_TRIES = 3;
const RETRY_BASE_MS = 1_000;
const SHUTDOWN_WAIT_MS = 5_000;

/**
 * `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<exact body>">`, Stripe style: receivers verify
 * before parsing. The time is signed with the body so that a captured delivery (a proxy's log, a
 * receiver's request dump) can be refused once it is older than the receiver's tolerance, instead
 * of being replayable for ever. `v1` names the scheme, so another can be sent beside it later.
 * While a secret is rotated, a second `v1` signs with the previous one: a receiver accepts a
 * delivery when any `v1` matches its secret, so each receiver moves to the new secret on its own
 * schedule.
 */
export function signCallback(secret: string, timestamp: number, body: string, previousSecret?: string): string {
  const signed = `${timestamp}.${body}`;
  const v1 = (key: string) => `v1=${createHmac('sha256', key).update(signed).digest('hex')}`;
  return previousSecret === undefined ? `t=${timestamp},${v1(secret)}` : `t=${timestamp},${v1(secret)},${v1(previousSecret)}`;
}

/**
 * POSTs a finished job to its `callback_url`, signed with JOBS_CALLBACK_SECRET. Off the worker's
 * path (a slow receiver must not hold a job slot), a few tries on network errors and 5xx, then
 * given up with a log line: the job itself is already final and readable with GET /v1/jobs/{id}.
 * Connections go through the callback policy (JOBS_CALLBACK_ALLOWED_HOSTS, see callback-agent.ts).
 */
@Injectable()
export class JobCallbacks implements OnApplicationShutdown {
  private readonly logger: Logger;
  private readonly inFlight = new Set<Promise<void>>();
  private readonly agent: Agent;

  constructor(
    private readonly config: AppConfig,
    appLogger: AppLogger,
    policy: CallbackPolicy,
    private readonly clock: Clock,
  ) {
    this.logger = appLogger.logger.child({ context: 'JobCallbacks' });
    this.agent = createCallbackAgent(policy);
  }

  notify(job: JobRecord): void {
    if (!job.callbackUrl) return;
    const secret = this.config.jobs.callbackSecret;
    if (!secret) {
      this.logger.warn({ jobId: job.id }, 'job has a callback_url but JOBS_CALLBACK_SECRET is no longer set; not delivered');
      return;
    }
    const delivery = this.deliver(job.callbackUrl, job, secret).finally(() => this.inFlight.delete(delivery));
    this.inFlight.add(delivery);
  }

  /** Shutdown: give deliveries under way a moment to land. */
  async drain(): Promise<void> {
    if (this.inFlight.size === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled([...this.inFlight]), new Promise((resolve) => (timer = setTimeout(resolve, SHUTDOWN_WAIT_MS)))]);
    clearTimeout(timer);
  }

  /** After drain(): whatever is still trying is cut off. */
  async onApplicationShutdown(): Promise<void> {
    await this.agent.destroy();
  }

  private async deliver(url: string, job: JobRecord, secret: string): Promise<void> {
    const body = JSON.stringify(jobView(job));
    let last = '';
    for (let tryNo = 1; tryNo <= DELIVERY_TRIES; tryNo += 1) {
      // Signed afresh for each try: a retry seconds later must still fall within the receiver's tolerance.
      const timestamp = Math.floor(this.clock.nowMs() / 1000);
      const headers = {
        'content-type': 'application/json',
        'user-agent': 'gatehouse-jobs',
        [SIGNATURE_HEADER]: signCallback(secret, timestamp, body, this.config.jobs.callbackPreviousSecret),
        [TIMESTAMP_HEADER]: String(timestamp),
        'x-gatehouse-job-id': job.id,
      };
      try {
        // No redirects: a signed body must go only where the submitter said.
        const res = await fetch(url, {
          method: 'POST',
          headers,
          body,
          redirect: 'manual',
          signal: AbortSignal.timeout(DELIVERY_TIMEOUT_MS),
          dispatcher: this.agent,
        });
        await res.body?.cancel();
        if (res.status < 500) {
          if (res.status >= 300) this.logger.warn({ jobId: job.id, status: res.status }, 'callback receiver refused the delivery');
          return;
        }
        last = `HTTP ${res.status}`;
      } catch (error) {
        const refused = refusedBy(error);
        if (refused) {
          // The same answer on every try: said once, not retried. No URL path (it may carry tokens).
          this.logger.warn({ jobId: job.id, host: safeHost(url), reason: refused.message }, 'callback not delivered: host not allowed');
          return;
        }
        last = (error as Error).message;
      }
      if (tryNo < DELIVERY_TRIES) await new Promise((resolve) => setTimeout(resolve, RETRY_BASE_MS * 2 ** (tryNo - 1)));
    }
    // The URL is the submitter's own; its host is enough to find the problem, its path may carry tokens.
    this.logger.warn({ jobId: job.id, host: safeHost(url), err: last }, 'callback delivery failed after retries');
  }
}

function safeHost(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return 'invalid';
  }
}
