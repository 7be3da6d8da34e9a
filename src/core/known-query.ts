import { applyDecorators, type CanActivate, type ExecutionContext, UseGuards } from '@nestjs/common';
import type { FastifyRequest } from 'fastify';
import { rejectUnknownQuery } from './validate.js';

/**
 * Method-level, after the class's auth guards: a query parameter the route does not take is 400,
 * naming it. A misspelt filter (`?userid=`) was ignored and the answer was the whole, unfiltered
 * list, which reads as "this user did all of this".
 */
export const KnownQuery = (...allowed: string[]): MethodDecorator => applyDecorators(UseGuards(new KnownQueryGuard(allowed)));

class KnownQueryGuard implements CanActivate {
  constructor(private readonly allowed: readonly string[]) {}

  canActivate(context: ExecutionContext): boolean {
    rejectUnknownQuery(context.switchToHttp().getRequest<FastifyRequest>().query, this.allowed);
    return true;
  }
}
