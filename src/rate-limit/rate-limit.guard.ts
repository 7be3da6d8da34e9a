import { Injectable } from '@nestjs/common';
import { Reflector } from '@nestjs/core';
import {
  InjectThrottlerOptions,
  InjectThrottlerStorage,
  ThrottlerGuard,
  type ThrottlerModuleOptions,
  type ThrottlerRequest,
  type ThrottlerStorage,
} from '@nestjs/throttler';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { type AdmissionGuard, DEFERRED_ADMISSION } from '../identity/auth.guard.js';
import { RateLimiter } from './rate-limiter.service.js';

/**
 * The throttler guard, run right after the key check on every /v1 and /admin route (identity's
 * AdmissionStep delegates here). Nest's ThrottlerGuard keeps its skip decorators and options;
 * the per-request work is replaced: one store call checks the key's, the user's and the
 * department's limits at once (the stock guard makes one storage call per throttler), and the
 * headers and the 429 follow the OpenAI names instead of X-RateLimit-*.
 */
@Injectable()
export class RateLimitGuard extends ThrottlerGuard implements AdmissionGuard {
  constructor(
    @InjectThrottlerOptions() options: ThrottlerModuleOptions,
    @InjectThrottlerStorage() storage: ThrottlerStorage,
    reflector: Reflector,
    private readonly limiter: RateLimiter,
  ) {
    super(options, storage, reflector);
  }

  protected override async handleRequest({ context }: ThrottlerRequest): Promise<boolean> {
    const http = context.switchToHttp();
    const request = http.getRequest<FastifyRequest>();
    const principal = request.principal;
    // The key guard ran first; without a principal this route was wired wrongly.
    if (!principal) throw new Error('rate limit guard reached without an authenticated principal');
    const reply = http.getResponse<FastifyReply>();
    const verdict = this.limiter.admit(principal, isAdminRoute(request) ? 'admin' : 'api').then((admission) => {
      // Set on the reply now, so they go out with the answer, an error, or a stream's first bytes.
      void reply.headers(admission.headers);
      if (admission.error) throw admission.error;
    });
    if (!this.reflector.get<boolean | undefined>(DEFERRED_ADMISSION, context.getHandler())) {
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
