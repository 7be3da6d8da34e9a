import { type ArgumentsHost, Catch, type ExceptionFilter, HttpException } from '@nestjs/common';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { GatewayError, isGatewayError, NO_CLIENT_RETRY } from './errors.js';
import { LogThrottle } from './log-throttle.js';

/**
 * Maps anything thrown anywhere (our GatewayError, Nest's HttpExceptions such as the route 404,
 * Fastify's body-parser errors) onto the one OpenAI error envelope. Unknown errors become a
 * 500 whose message says nothing about internals; the detail goes to the log only.
 */
export function toGatewayError(error: unknown): GatewayError {
  if (isGatewayError(error)) return error;
  if (error instanceof HttpException) {
    // Nest wraps Fastify's own 4xx errors (the body parser's) in an HttpException that keeps the
    // original as `cause`: its code says what went wrong, where the wrapper only has Fastify's
    // wording ("Body cannot be empty when content-type is set to 'application/json'" was answered
    // invalid_value, not invalid_json like every other unparseable body).
    if (error.cause instanceof Error && error.cause.name === 'FastifyError') return toGatewayError(error.cause);
    return fromStatus(error.getStatus(), error.message, error);
  }
  if (typeof error === 'object' && error !== null) {
    const e = error as { statusCode?: unknown; code?: unknown; message?: unknown };
    const status = typeof e.statusCode === 'number' ? e.statusCode : undefined;
    const code = typeof e.code === 'string' ? e.code : '';
    if (code === 'FST_ERR_CTP_BODY_TOO_LARGE' || status === 413) {
      return new GatewayError('payload_too_large', 'Request body is larger than this gateway accepts.', { cause: error });
    }
    if (code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' || status === 415) {
      return new GatewayError('unsupported_media_type', 'Content-Type must be application/json.', { cause: error });
    }
    if (error instanceof SyntaxError || code === 'FST_ERR_CTP_EMPTY_JSON_BODY' || code === 'FST_ERR_CTP_INVALID_JSON_BODY') {
      return new GatewayError('invalid_json', 'Request body is not valid JSON.', { cause: error });
    }
    if (status !== undefined && status >= 400 && status < 500) {
      return fromStatus(status, typeof e.message === 'string' ? e.message : 'Bad request.', error);
    }
    if (databaseUnreachable(error)) {
      return new GatewayError('unavailable', 'The gateway cannot reach its database right now; retry later.', { cause: error });
    }
    if (databaseDataException(error)) {
      return new GatewayError('invalid_value', 'A value in the request is out of range or malformed for the gateway to store or compare.', { cause: error });
    }
  }
  return new GatewayError('internal_error', 'The gateway hit an internal error. The request id identifies it in the logs.', { cause: error });
}

// A socket that could not connect or broke, as Node names it.
const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);
// PostgreSQL's SQLSTATEs for "not now" rather than "wrong": connection exceptions (class 08), the
// server shutting down or starting (57P01-57P03), insufficient resources (class 53: disk full, out
// of memory, too many connections), system and I/O errors (class 58), a statement timeout, and a
// write refused by a read-only session (25006: a demoted primary, a replica; readiness says down).
const UNAVAILABLE_SQLSTATES = /^(08...|57P0[123]|53...|58...|57014|25006)$/;
// What node-postgres says, without a code, when a connection ends or a query times out.
const PG_CONNECTION_MESSAGE =
  /Connection terminated|Query read timeout|timeout exceeded when trying to connect|Client has encountered a connection error|Cannot use a pool after calling end/;

/**
 * Whether an error (or what it wraps: TypeORM's QueryFailedError keeps the driver's as
 * `driverError`) says the database is out of reach rather than that the statement was wrong. A
 * call that needed it while it was away is the API's 503, not a 500 bug; the paths that expect
 * this (key checks, budgets) map it themselves, this catches every other one (the admin API).
 */
export function databaseUnreachable(error: unknown): boolean {
  for (let e: unknown = error, depth = 0; typeof e === 'object' && e !== null && depth < 4; depth++) {
    const { code, message } = e as { code?: unknown; message?: unknown };
    if (typeof code === 'string' && (NETWORK_CODES.has(code) || UNAVAILABLE_SQLSTATES.test(code))) return true;
    if (typeof message === 'string' && PG_CONNECTION_MESSAGE.test(message)) return true;
    e = (e as { driverError?: unknown; cause?: unknown }).driverError ?? (e as { cause?: unknown }).cause;
  }
  return false;
}

// PostgreSQL's class 22, "data exception": a value out of range for its column (22003, 22008), a
// malformed one (22P02, 22007), a string too long (22001), ...
const DATA_EXCEPTION_SQLSTATE = /^22[0-9A-Z]{3}$/;

/**
 * Whether a query failed on a value rather than on the statement or the database: a backstop for
 * a value the edge validation let through (the edges check ranges themselves, with a better
 * message). Answered 400 invalid_value rather than 500, since it is the request's value.
 */
export function databaseDataException(error: unknown): boolean {
  for (let e: unknown = error, depth = 0; typeof e === 'object' && e !== null && depth < 4; depth++) {
    const { code } = e as { code?: unknown };
    if (typeof code === 'string' && DATA_EXCEPTION_SQLSTATE.test(code)) return true;
    e = (e as { driverError?: unknown; cause?: unknown }).driverError ?? (e as { cause?: unknown }).cause;
  }
  return false;
}

function fromStatus(status: number, message: string, cause: unknown): GatewayError {
  switch (status) {
    case 404:
      return new GatewayError('not_found', message.startsWith('Cannot ') ? `Unknown route: ${message.slice(7)}` : message, { cause });
    case 413:
      return new GatewayError('payload_too_large', 'Request body is larger than this gateway accepts.', { cause });
    case 415:
      // Nest wraps Fastify's "no parser for this content-type" in an HttpException.
      return new GatewayError('unsupported_media_type', 'Content-Type must be application/json.', { cause });
    case 401:
      return new GatewayError('invalid_api_key', message, { cause });
    case 403:
      return new GatewayError('forbidden', message, { cause });
    case 409:
      return new GatewayError('conflict', message, { cause });
    case 429:
      return new GatewayError('rate_limit_exceeded', message, { cause });
    case 503:
      return new GatewayError('unavailable', message, { cause });
    default:
      return status >= 400 && status < 500
        ? new GatewayError('invalid_value', message, { cause })
        : new GatewayError('internal_error', 'The gateway hit an internal error. The request id identifies it in the logs.', { cause });
  }
}

/**
 * The 5xx that say a dependency is down or failing (503 unavailable, 502/504 from the upstream)
 * come by the thousand per second during an outage, one per request, all alike: logged once per
 * code per 10 s, with how many more there were. Every request still has its audit row and its
 * metrics; the components that fail log their own transitions. A 500 is a bug: always logged in
 * full.
 */
const dependencyErrors = new LogThrottle();

export function sendError(reply: FastifyReply, request: FastifyRequest, error: unknown, logger: Logger, throttle: LogThrottle = dependencyErrors): void {
  const gatewayError = toGatewayError(error);
  if (gatewayError.status >= 500) {
    // Log the cause's message (and for a bug its stack), never request headers or bodies (they hold keys and prompts).
    const cause = gatewayError.cause instanceof Error ? gatewayError.cause : undefined;
    if (gatewayError.status === 500) {
      logger.error(
        { reqId: request.id, code: gatewayError.code, err: cause ? { message: cause.message, stack: cause.stack } : undefined },
        gatewayError.message,
      );
    } else {
      const earlier = throttle.admit(gatewayError.code);
      if (earlier !== undefined) {
        logger.warn(
          { reqId: request.id, code: gatewayError.code, status: gatewayError.status, cause: cause?.message, sameSinceLastLine: earlier },
          gatewayError.message,
        );
      }
    }
  }
  if (gatewayError.code === 'invalid_value' && !isGatewayError(error) && databaseDataException(error)) {
    // The backstop above answered a value PostgreSQL refused: the caller's 400, but also a gap in
    // the edge validation (or a bug in a statement), so said in the log, throttled like the 5xx.
    const earlier = throttle.admit('database_data_exception');
    if (earlier !== undefined) {
      logger.warn(
        { reqId: request.id, code: gatewayError.code, cause: (error as Error).message, sameSinceLastLine: earlier },
        'a query refused a value: answered 400 invalid_value',
      );
    }
  }
  if (reply.sent || reply.raw.headersSent) return;
  if (gatewayError.headers) void reply.headers(gatewayError.headers);
  if (NO_CLIENT_RETRY.has(gatewayError.code)) void reply.header('x-should-retry', 'false');
  void reply.status(gatewayError.status).header('content-type', 'application/json; charset=utf-8').send(gatewayError.toEnvelope());
}

@Catch()
export class OpenAiErrorFilter implements ExceptionFilter {
  constructor(private readonly logger: Logger) {}

  catch(exception: unknown, host: ArgumentsHost): void {
    const http = host.switchToHttp();
    sendError(http.getResponse<FastifyReply>(), http.getRequest<FastifyRequest>(), exception, this.logger);
  }
}
