import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import type { Principal } from '../identity/principal.js';
import { type LimitScope, RateLimitOverrides } from './rate-limit-overrides.service.js';
import { type Bucket, type BucketState, RateLimitStore } from './rate-limit.store.js';

export const WINDOW_MS = 60_000;

/** Which limits a route counts against: the client API, or the admin API (separately, per key). */
export type Door = 'api' | 'admin';

type Subject = LimitScope | 'admin_key';
type Kind = 'requests' | 'tokens';

interface Planned extends Bucket {
  subject: Subject;
  kind: Kind;
}

export interface Admission {
  allowed: boolean;
  /** The tightest applying limit, as response headers (every response carries them). */
  headers: Record<string, string>;
  /** Set when refused: 429 with retry-after. */
  error: GatewayError | undefined;
}

const SUBJECT_NAME: Record<Subject, string> = { key: 'API key', user: 'user', department: 'department', admin_key: 'admin API key' };

/**
 * Per-request admission against the key's, the user's and the department's limits (requests per
 * minute, and tokens per minute where configured), in one store round trip. Token counters grow
 * after each answer (`recordTokens`); a request is refused while a token counter is at its limit.
 */
@Injectable()
export class RateLimiter {
  private readonly logger: Logger;
  private readonly adminRpm: number;

  constructor(
    private readonly store: RateLimitStore,
    private readonly overrides: RateLimitOverrides,
    config: AppConfig,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'RateLimit' });
    this.adminRpm = config.rateLimit.adminRpm;
  }

  /** `spendsTokens`: the route calls a model, so tokens-per-minute limits refuse it too. */
  async admit(principal: Principal, door: Door, spendsTokens = false): Promise<Admission> {
    const buckets = this.bucketsFor(principal, door, spendsTokens);
    const result = await this.store.hit(buckets);
    const headers: Record<string, string> = {};
    const requests = tightest(buckets, result.states, 'requests');
    if (requests) setTrio(headers, 'requests', requests.bucket, requests.state);
    const tokens = tightest(buckets, result.states, 'tokens');
    if (tokens) setTrio(headers, 'tokens', tokens.bucket, tokens.state);
    if (result.allowed) return { allowed: true, headers, error: undefined };

    // Retry when the last refusing counter restarts.
    let refusing: { bucket: Planned; state: BucketState } | undefined;
    buckets.forEach((bucket, i) => {
      const state = result.states[i];
      if (state.blocked && (!refusing || state.resetMs > refusing.state.resetMs)) refusing = { bucket, state };
    });
    const { bucket, state } = refusing ?? { bucket: buckets[0], state: result.states[0] };
    // The trio of the refused kind describes the counter that refused, as retry-after and `param`
    // do: two full counters of one kind otherwise disagree (the other one's reset comes sooner),
    // and a client that waits for the header's reset is refused again.
    setTrio(headers, bucket.kind, bucket, state);
    const retryAfter = Math.max(1, Math.ceil(state.resetMs / 1000));
    headers['retry-after'] = String(retryAfter);
    const error = new GatewayError(
      'rate_limit_exceeded',
      `Rate limit reached for ${bucket.kind} per minute on this ${SUBJECT_NAME[bucket.subject]}: limit ${bucket.limit}, used ${state.used}. Try again in ${retryAfter}s.`,
      { param: bucket.subject, headers },
    );
    return { allowed: false, headers, error };
  }

  /** Counts an answer's tokens against the token limits that apply; off the response path, never throws. */
  recordTokens(principal: Principal, tokens: number): void {
    if (!(tokens > 0)) return;
    const keys: string[] = [];
    for (const [scope, id] of subjects(principal)) {
      if (this.limit(scope, id).tokensPerMinute !== undefined) keys.push(`${scope[0]}t:${id}`);
    }
    if (keys.length === 0) return;
    this.store.add(keys, tokens, WINDOW_MS).catch((error: unknown) => this.logger.warn({ err: (error as Error).message }, 'token count failed'));
  }

  private bucketsFor(principal: Principal, door: Door, spendsTokens: boolean): Planned[] {
    if (door === 'admin') {
      return [{ key: `a:${principal.keyId}`, limit: this.adminRpm, windowMs: WINDOW_MS, cost: 1, subject: 'admin_key', kind: 'requests' }];
    }
    const buckets: Planned[] = [];
    for (const [scope, id] of subjects(principal)) {
      const limit = this.limit(scope, id);
      // Key names: k/u/d for requests, kt/ut/dt for tokens.
      buckets.push({ key: `${scope[0]}:${id}`, limit: limit.requestsPerMinute, windowMs: WINDOW_MS, cost: 1, subject: scope, kind: 'requests' });
      if (spendsTokens && limit.tokensPerMinute !== undefined) {
        buckets.push({ key: `${scope[0]}t:${id}`, limit: limit.tokensPerMinute, windowMs: WINDOW_MS, cost: 0, subject: scope, kind: 'tokens' });
      }
    }
    return buckets;
  }

  private limit(scope: LimitScope, id: string) {
    return this.overrides.get(scope, id) ?? this.overrides.defaults(scope);
  }
}

function subjects(principal: Principal): Array<[LimitScope, string]> {
  return [
    ['key', principal.keyId],
    ['user', principal.userId],
    ['department', principal.departmentId],
  ];
}

/**
 * The bucket of a kind with the least left. Ties: the smaller limit, but among counters with
 * none left the one that resets last, since the next request is refused until then (as the
 * refusal's retry-after reckons): a client waiting for an earlier counter's reset would be
 * refused again.
 */
function tightest(buckets: Planned[], states: BucketState[], kind: Kind): { bucket: Planned; state: BucketState } | undefined {
  let best: { bucket: Planned; state: BucketState; left: number } | undefined;
  buckets.forEach((bucket, i) => {
    if (bucket.kind !== kind) return;
    const state = states[i];
    const left = Math.max(0, bucket.limit - state.used);
    if (!best || left < best.left) best = { bucket, state, left };
    else if (left === best.left && (left === 0 ? state.resetMs > best.state.resetMs : bucket.limit < best.bucket.limit)) best = { bucket, state, left };
  });
  return best;
}

function setTrio(headers: Record<string, string>, kind: Kind, bucket: Planned, state: BucketState): void {
  headers[`x-ratelimit-limit-${kind}`] = String(bucket.limit);
  headers[`x-ratelimit-remaining-${kind}`] = String(Math.max(0, bucket.limit - state.used));
  headers[`x-ratelimit-reset-${kind}`] = formatReset(state.resetMs);
}

/** OpenAI's format for the reset headers: "250ms", "17s", "1m0s". */
export function formatReset(ms: number): string {
  const value = Math.max(0, Math.ceil(ms));
  if (value < 1000) return `${value}ms`;
  const seconds = Math.ceil(value / 1000);
  return seconds < 60 ? `${seconds}s` : `${Math.floor(seconds / 60)}m${seconds % 60}s`;
}
