import type { ExecutionContext } from '@nestjs/common';
import { ExecutionContextHost } from '@nestjs/core/helpers/execution-context-host.js';
import { Reflector } from '@nestjs/core';
import { SkipThrottle, type ThrottlerStorage } from '@nestjs/throttler';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';
import { GatewayError } from '../core/errors.js';
import { DeferredAdmission } from '../identity/auth.guard.js';
import type { Principal } from '../identity/principal.js';
import { RateLimitGuard } from './rate-limit.guard.js';
import type { Admission, RateLimiter } from './rate-limiter.service.js';

class Routes {
  plain(): void {}
  @DeferredAdmission()
  deferred(): void {}
  @SkipThrottle()
  skipped(): void {}
}

const principal: Principal = { keyId: 'k1', keyPrefix: 'gh-abc', userId: 'u1', departmentId: 'd1', role: 'user', cacheScope: 'user', expiresAt: undefined };

/** A limiter that answers from a script and counts what it was asked. */
function limiter(answer: Admission): RateLimiter & { calls: number } {
  const fake = {
    calls: 0,
    admit() {
      fake.calls += 1;
      return Promise.resolve(answer);
    },
  };
  return fake as unknown as RateLimiter & { calls: number };
}

function context(handler: keyof Routes): { ctx: ExecutionContext; request: FastifyRequest; sent: Record<string, string> } {
  const sent: Record<string, string> = {};
  const request = { principal, routeOptions: { url: '/v1/chat/completions' }, url: '/v1/chat/completions' } as unknown as FastifyRequest;
  const reply = {
    headers(h: Record<string, string>) {
      Object.assign(sent, h);
      return reply;
    },
  } as unknown as FastifyReply;
  // eslint-disable-next-line @typescript-eslint/unbound-method -- the handler is only a metadata target
  const ctx = new ExecutionContextHost([request, reply], Routes, Routes.prototype[handler]);
  ctx.setType('http');
  return { ctx, request, sent };
}

async function guard(answer: Admission): Promise<{ guard: RateLimitGuard; limiter: RateLimiter & { calls: number } }> {
  const fake = limiter(answer);
  const g = new RateLimitGuard({ throttlers: [{ limit: 1, ttl: 60_000 }] }, {} as ThrottlerStorage, new Reflector(), fake);
  await g.onModuleInit();
  return { guard: g, limiter: fake };
}

const ALLOWED: Admission = { allowed: true, headers: { 'x-ratelimit-remaining-requests': '9' }, error: undefined };
const REFUSED: Admission = {
  allowed: false,
  headers: { 'x-ratelimit-remaining-requests': '0', 'retry-after': '7' },
  error: new GatewayError('rate_limit_exceeded', 'Rate limit reached'),
};

describe('RateLimitGuard', () => {
  it('admits a plain route by awaiting the verdict and sets the rate-limit headers', async () => {
    const { guard: g, limiter: l } = await guard(ALLOWED);
    const { ctx, request, sent } = context('plain');
    await expect(g.canActivate(ctx)).resolves.toBe(true);
    expect(l.calls).toBe(1);
    expect(sent['x-ratelimit-remaining-requests']).toBe('9');
    expect(request.admission).toBeUndefined();
  });

  it('refuses a plain route over its limit with the 429 and retry-after', async () => {
    const { guard: g } = await guard(REFUSED);
    const { ctx, sent } = context('plain');
    await expect(g.canActivate(ctx)).rejects.toMatchObject({ code: 'rate_limit_exceeded' });
    expect(sent['retry-after']).toBe('7');
  });

  it('leaves the verdict of a @DeferredAdmission() route to the pipeline, which still gets the 429', async () => {
    const { guard: g } = await guard(REFUSED);
    const { ctx, request } = context('deferred');
    await expect(g.canActivate(ctx)).resolves.toBe(true);
    expect(request.admission).toBeInstanceOf(Promise);
    await expect(request.admission).rejects.toMatchObject({ code: 'rate_limit_exceeded' });
  });

  it('does not count a @SkipThrottle() route at all', async () => {
    const { guard: g, limiter: l } = await guard(REFUSED);
    const { ctx } = context('skipped');
    await expect(g.canActivate(ctx)).resolves.toBe(true);
    expect(l.calls).toBe(0);
  });

  it('reads the decorators once per handler, however many requests pass', async () => {
    const { guard: g, limiter: l } = await guard(ALLOWED);
    const reflector = (g as unknown as { reflector: Reflector }).reflector;
    let lookups = 0;
    const original = reflector.get.bind(reflector);
    reflector.get = ((...args: Parameters<Reflector['get']>): unknown => {
      lookups += 1;
      return original<unknown>(...args);
    }) as Reflector['get'];
    await g.canActivate(context('plain').ctx);
    const firstRequest = lookups;
    for (let i = 0; i < 4; i++) await g.canActivate(context('plain').ctx);
    expect(l.calls).toBe(5);
    expect(firstRequest).toBeGreaterThan(0);
    expect(lookups).toBe(firstRequest);
  });
});
