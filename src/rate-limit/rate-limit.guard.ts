import { type ExecutionContext, Injectable } from '@nestjs/common';
import { Reflector } from '@nestjs/core';
import {
  InjectThrottlerOptions,
  type ThrottlerOptions,
  InjectThrottlerStorage,
  ThrottlerGuard,
  type ThrottlerModuleOptions,
  type ThrottlerRequest,
  type ThrottlerStorage,
} from '@nestjs/throttler';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { type AdmissionGuard, DEFERRED_ADMISSION, SPENDS_TOKENS } from '../identity/auth.guard.js';
import { RateLimiter } from './rate-limiter.service.js';

/** `@SkipThrottle()`'s metadata key (throttler.constants, not exported by @nestjs/throttler). */
const THROTTLER_SKIP = 'THROTTLER:SKIP';

/** What a route's decorators say, read once per handler: the metadata never changes at runtime. */
interface RoutePlan {
  /** `@SkipThrottle()` for every configured throttler. */
  skip: boolean;
  /** `@DeferredAdmission()`: the pipeline awaits the verdict next to its cache lookup. */
  deferred: boolean;
  /** `@SpendsTokens()`: tokens-per-minute limits apply too. */
  spendsTokens: boolean;
}

/**
 * The throttler guard, run right after the key check on every /v1 and /admin route (identity's
 * AdmissionStep delegates here). Nest's ThrottlerGuard keeps its skip decorators and options;
 * the per-request work is replaced: one store call checks the key's, the user's and the
 * department's limits at once (the stock guard makes one storage call per throttler), and the
 * headers and the 429 follow the OpenAI names instead of X-RateLimit-*.
 */
@Injectable()
export class RateLimitGuard extends ThrottlerGuard implements AdmissionGuard {
  private readonly plans = new WeakMap<object, RoutePlan>();

  constructor(
    @InjectThrottlerOptions() options: ThrottlerModuleOptions,
    @InjectThrottlerStorage() storage: ThrottlerStorage,
    reflector: Reflector,
    private readonly limiter: RateLimiter,
  ) {
    super(options, storage, reflector);
  }

  /**
   * The stock canActivate reads five decorators per throttler through the reflector and awaits
   * each resolved value, on every request (~12 metadata lookups and 4 microtask hops); our limits
   * come from RateLimiter, so only the skip and deferral decorators matter, read once per handler.
   */
  override canActivate(context: ExecutionContext): Promise<boolean> {
    const plan = this.planFor(context);
    if (plan.skip) return Promise.resolve(true);
    return this.admit(context, plan);
  }

  /** Kept for callers of the ThrottlerGuard API; the guard itself goes through `canActivate`. */
  protected override handleRequest({ context }: ThrottlerRequest): Promise<boolean> {
    return this.admit(context, this.planFor(context));
  }

  private planFor(context: ExecutionContext): RoutePlan {
    const handler = context.getHandler();
    let plan = this.plans.get(handler);
    if (!plan) {
      const targets = [handler, context.getClass()];
      const throttlers: ThrottlerOptions[] = this.throttlers;
      plan = {
        skip: throttlers.length > 0 && throttlers.every((t) => this.reflector.getAllAndOverride<boolean | undefined>(`${THROTTLER_SKIP}${t.name ?? 'default'}`, targets) === true),
        deferred: this.reflector.get<boolean | undefined>(DEFERRED_ADMISSION, handler) === true,
        spendsTokens: this.reflector.get<boolean | undefined>(SPENDS_TOKENS, handler) === true,
      };
      this.plans.set(handler, plan);
    }
    return plan;
  }

  private async admit(context: ExecutionContext, { deferred, spendsTokens }: RoutePlan): Promise<boolean> {
    const http = context.switchToHttp();
    const request = http.getRequest<FastifyRequest>();
    const principal = request.principal;
    // The key guard ran first; without a principal this route was wired wrongly.
    if (!principal) throw new Error('rate limit guard reached without an authenticated principal');
    const reply = http.getResponse<FastifyReply>();
    const verdict = this.limiter.admit(principal, isAdminRoute(request) ? 'admin' : 'api', spendsTokens).then((admission) => {
      // Set on the reply now, so they go out with the answer, an error, or a stream's first bytes.
      void reply.headers(admission.headers);
      if (admission.error) throw admission.error;
    });
    if (!deferred) {
      await verdict;
      return true;
    }
    // Deferred: the pipeline awaits it together with its cache lookup. The no-op handler only
    // keeps a refusal from counting as unhandled before the pipeline gets to it; awaiting
    // `request.admission` still throws the 429.
    verdict.catch(() => undefined);
    request.admission = verdict;
    return true;
  }
}

function isAdminRoute(request: FastifyRequest): boolean {
  const url = request.routeOptions.url ?? request.url;
  return url === '/admin' || url.startsWith('/admin/');
}
