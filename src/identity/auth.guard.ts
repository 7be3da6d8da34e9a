import {
  applyDecorators,
  type CanActivate,
  createParamDecorator,
  type ExecutionContext,
  Inject,
  Injectable,
  Optional,
  SetMetadata,
  UseGuards,
} from '@nestjs/common';
import { ApiBearerAuth } from '@nestjs/swagger';
import type { FastifyRequest } from 'fastify';
import { GatewayError } from '../core/errors.js';
import { IdentityService } from './identity.service.js';
import type { Principal } from './principal.js';

declare module 'fastify' {
  interface FastifyRequest {
    principal?: Principal;
    /**
     * The admission verdict (rate limits) of a route marked `@DeferredAdmission()`, still in
     * flight: rejects with the 429. Whoever handles such a route must await it before anything
     * has an effect, and before rendering any other error (see `admitted` in openai-api).
     */
    admission?: Promise<void>;
  }
}

export function presentedKey(request: FastifyRequest): string | undefined {
  const authorization = request.headers.authorization;
  if (typeof authorization === 'string') {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    if (match?.[1]) return match[1];
  }
  const apiKey = request.headers['x-api-key'];
  return typeof apiKey === 'string' && apiKey.length > 0 ? apiKey : undefined;
}

@Injectable()
export class ApiKeyGuard implements CanActivate {
  constructor(private readonly identity: IdentityService) {}

  async canActivate(context: ExecutionContext): Promise<boolean> {
    const request = context.switchToHttp().getRequest<FastifyRequest>();
    const key = presentedKey(request);
    if (key === undefined) {
      throw new GatewayError('invalid_api_key', 'Missing API key. Send it as "Authorization: Bearer <key>" or "x-api-key".');
    }
    request.principal = await this.identity.authenticate(key);
    return true;
  }
}

@Injectable()
export class AdminGuard implements CanActivate {
  canActivate(context: ExecutionContext): boolean {
    const principal = context.switchToHttp().getRequest<FastifyRequest>().principal;
    if (principal?.role !== 'admin') throw new GatewayError('forbidden', 'This route needs an admin key.');
    return true;
  }
}

/**
 * What runs right after the key is known on every authenticated route: the rate limiter, bound
 * by RateLimitModule. A port, so identity imports no feature and the two decorators below cover
 * every /v1 and /admin controller, including those other features add.
 */
export abstract class AdmissionGuard implements CanActivate {
  abstract canActivate(context: ExecutionContext): Promise<boolean>;
}

@Injectable()
export class AdmissionStep implements CanActivate {
  constructor(@Optional() @Inject(AdmissionGuard) private readonly admission: AdmissionGuard | null) {}

  canActivate(context: ExecutionContext): boolean | Promise<boolean> {
    return this.admission ? this.admission.canActivate(context) : true;
  }
}

export const DEFERRED_ADMISSION = 'gatehouse:deferredAdmission';

/**
 * On a completion door: the admission check is started by the guard but awaited by the pipeline
 * (`request.admission`), so its Redis command and the cache lookup leave in one write (ioredis
 * auto-pipelining batches the commands of one event-loop turn) instead of two round trips in a row.
 */
export const DeferredAdmission = (): MethodDecorator => SetMetadata(DEFERRED_ADMISSION, true);

export const SPENDS_TOKENS = 'gatehouse:spendsTokens';

/**
 * On a route that calls a model (the completion doors, sync or async): its request is also
 * refused while a tokens-per-minute limit is used up. Other routes (reading a job, usage, the
 * model list) count requests only: tokens the caller already spent must not keep it from reading
 * the job they paid for.
 */
export const SpendsTokens = (): MethodDecorator => SetMetadata(SPENDS_TOKENS, true);

/** Class-level: every route of a /v1 controller needs a valid key (then passes the rate limiter). */
export const Authenticated = (): ClassDecorator & MethodDecorator => applyDecorators(ApiBearerAuth(), UseGuards(ApiKeyGuard, AdmissionStep));

/** Class-level: every route of an admin controller needs an admin key (then passes the admin rate limit). */
export const AdminOnly = (): ClassDecorator & MethodDecorator => applyDecorators(ApiBearerAuth(), UseGuards(ApiKeyGuard, AdminGuard, AdmissionStep));

export const CurrentPrincipal = createParamDecorator((_data: unknown, context: ExecutionContext): Principal => {
  const principal = context.switchToHttp().getRequest<FastifyRequest>().principal;
  // The guard ran first; reaching here without a principal is a wiring bug, not a client error.
  if (!principal) throw new Error('CurrentPrincipal used on a route without @Authenticated()/@AdminOnly()');
  return principal;
});
