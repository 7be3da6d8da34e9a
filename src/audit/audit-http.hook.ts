import { Injectable, type OnModuleInit } from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { AppConfig } from '../config/config.js';
import type { GatewayError } from '../core/errors.js';
import { keyPrefix } from '../identity/api-key.js';
import { presentedKey } from '../identity/auth.guard.js';
import { cleanString } from './audit-event.js';
import { AuditService } from './audit.service.js';
import { MAX_SUMMARY_BYTES, redactedSummary, redactText } from './redact.js';

const READ_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);
// Response fields worth keeping from a successful change: what was created or which version it
// became. A whitelist, so a created key's secret (`key`) can never be picked up.
const RESULT_FIELDS = ['id', 'prefix', 'version'] as const;
// Parsed only for changes and errors (a read's answer is never looked at): a routing table of many
// rules answers well over 64 KiB, and its new version must still reach the audit row.
const MAX_PARSED_PAYLOAD = 8 * 1024 * 1024;
// What a caller who is not an admin (no key, a bad one, a user's key) sent is theirs to choose and
// cheap to send: its row keeps the body's field names only and a smaller share of query and path,
// so a flood of refusals buffered through an outage stays near the audit's sizing (operations.md).
const STRANGER_SUMMARY_BYTES = 1024;
const MAX_BODY_FIELDS = 20;
const MAX_FIELD_NAME = 64;

const outcomes = new WeakMap<FastifyRequest, Record<string, unknown>>();
/**
 * Requests whose row is written. A recorded answer can end three ways: it finishes (onResponse),
 * its connection closes before it finished (the 'close' listener onSend adds), or the connection
 * was gone before the handler answered (onSend itself); a write error runs onResponse and then
 * 'close'. Whichever comes first records it.
 */
const recorded = new WeakSet<FastifyRequest>();

/**
 * Records admin changes without touching any admin controller: every non-GET request under
 * /admin (failed ones included: they matter for security review), and every 401/403 there.
 * On /v1 it records what the completion pipeline could not: every error answer the pipeline did
 * not audit itself (a 401, a 400 before the body became a call, a 413, a 429 on an async submit,
 * a 404) and every accepted async submit (202, with its job's id), so every request leaves a
 * row. Fastify hooks rather than a Nest interceptor, which would cost an rxjs chain on every
 * request (PERFORMANCE.md); for a /v1 answer below 400 the hooks cost a comparison or two.
 */
@Injectable()
export class AuditHttpHook implements OnModuleInit {
  constructor(
    private readonly adapterHost: HttpAdapterHost,
    private readonly config: AppConfig,
    private readonly audit: AuditService,
  ) {}

  onModuleInit(): void {
    // A worker has no HTTP server (and may be built as a plain application context).
    if (this.config.role === 'worker') return;
    const adapter = this.adapterHost.httpAdapter as HttpAdapterHost['httpAdapter'] | undefined;
    const fastify = adapter?.getInstance<FastifyInstance>();
    if (typeof fastify?.addHook !== 'function') return;

    fastify.addHook('onSend', (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void) => {
      if (recordedAnswer(request, reply.statusCode) !== undefined) {
        outcomes.set(request, readOutcome(reply.statusCode, payload));
        // Fastify runs onResponse only for a response that finished: one whose caller hung up
        // (a refusal decided after a slow key lookup, a change made after the caller gave up)
        // would leave no row. A listener on recorded answers only: a successful completion, which
        // the pipeline audits, never gets one.
        const raw = reply.raw;
        if (raw.destroyed) {
          this.record(request, reply, true);
        } else {
          raw.once('close', () => {
            if (!raw.writableFinished) this.record(request, reply, true);
          });
        }
      }
      done(null, payload);
    });
    fastify.addHook('onResponse', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
      this.record(request, reply, false);
      done();
    });
  }

  /** The row of a recorded answer, once. `clientClosed`: the caller left before it reached it; the status is the handler's. */
  private record(request: FastifyRequest, reply: FastifyReply, clientClosed: boolean): void {
    const status = reply.statusCode;
    const kind = recordedAnswer(request, status);
    if (kind === undefined || recorded.has(request)) return;
    recorded.add(request);
    if (kind === 'api') this.recordApiAnswer(request, status, reply, clientClosed);
    else this.recordAdmin(request, status, clientClosed);
  }

  /**
   * A request Fastify refused before routing (gateway.ts frameworkError: a URL it cannot decode, a
   * path parameter over its length limit), which no hook sees. Recorded when its path is an admin
   * or API one, whatever the method: nothing authenticated it, so it counts as a 401 does.
   */
  recordUnrouted(request: FastifyRequest, error: GatewayError): void {
    const url = unroutedUrl(request);
    const admin = isAdminUrl(url);
    if (!admin && !isApiUrl(url)) return;
    outcomes.set(request, { error: { code: error.code, type: error.type, param: error.param, message: redactText(error.message) } });
    if (admin) this.recordAdmin(request, error.status, false);
    else this.recordApiAnswer(request, error.status, undefined, false);
  }

  /**
   * A /v1 answer the pipeline did not audit: who (or which key prefix), what, and the error; or
   * an accepted async submit (202), with the job it made (its tries are audited as the job runs).
   */
  private recordApiAnswer(request: FastifyRequest, status: number, reply: FastifyReply | undefined, clientClosed: boolean): void {
    const pattern = request.routeOptions.url ?? pathOf(request);
    const details: Record<string, unknown> = { ...(outcomes.get(request) ?? {}) };
    if (clientClosed) details.client_closed = true;
    const accepted = status === 202;
    if (accepted && reply?.getHeader('idempotent-replayed') === 'true') details.replayed = true;
    if (!request.principal) {
      const key = presentedKey(request);
      details.key_prefix = key === undefined ? null : keyPrefix(key);
      if (status === 401) details.auth = key === undefined ? 'missing_key' : 'invalid_key';
    }
    this.audit.record({
      principal: request.principal,
      action: `${request.method} ${redactText(pattern)}`,
      targetType: accepted ? 'job' : 'request',
      targetId: accepted ? (scalar((details.result as Record<string, unknown> | undefined)?.id) ?? null) : null,
      requestId: request.id,
      status,
      details,
    });
  }

  private recordAdmin(request: FastifyRequest, status: number, clientClosed: boolean): void {
    const pattern = request.routeOptions.url ?? pathOf(request);
    const params = stringRecord(request.params);
    const outcome = outcomes.get(request) ?? {};
    const result = outcome.result as Record<string, unknown> | undefined;
    // Only an admin can change anything, so only an admin's body says what a change was made of.
    // Before, a 401 kept the body it refused: a 3.8 MB one left a 3.78 MB row.
    const admin = request.principal?.role === 'admin';
    const budget = admin ? MAX_SUMMARY_BYTES : STRANGER_SUMMARY_BYTES;
    const sent = READ_METHODS.has(request.method) ? undefined : request.body;
    const details: Record<string, unknown> = {
      ip: request.ip,
      user_agent: typeof request.headers['user-agent'] === 'string' ? redactText(request.headers['user-agent']) : undefined,
      params: Object.keys(params).length > 0 ? redactedSummary(params, budget) : undefined,
      query: hasKeys(request.query) ? redactedSummary(request.query, budget) : undefined,
      body: admin && sent !== undefined ? redactedSummary(sent) : undefined,
      body_fields: admin ? undefined : fieldNames(sent),
      ...outcome,
    };
    if (clientClosed) details.client_closed = true;
    if (!request.principal) {
      // Never the key: its prefix only, enough to tell which credential was tried.
      const key = presentedKey(request);
      details.key_prefix = key === undefined ? null : keyPrefix(key);
      if (status === 401) details.auth = key === undefined ? 'missing_key' : 'invalid_key';
    } else if (status === 403) {
      details.auth = 'forbidden';
    }
    this.audit.record({
      principal: request.principal,
      action: `${request.method} ${redactText(pattern)}`,
      targetType: targetTypeOf(pattern),
      targetId: params.id ?? Object.values(params)[0] ?? scalar(result?.id) ?? scalar(result?.version) ?? null,
      requestId: request.id,
      status,
      details,
    });
  }
}

/**
 * Which answers leave a row here: a /v1 one the pipeline did not audit (`api`), and on /admin
 * every change and every 401/403 (`admin`). Reads that succeed or fail otherwise leave none.
 */
function recordedAnswer(request: FastifyRequest, status: number): 'api' | 'admin' | undefined {
  if (unauditedApiAnswer(request, status)) return 'api';
  return isAdminPath(request) && (!READ_METHODS.has(request.method) || status === 401 || status === 403) ? 'admin' : undefined;
}

function isAdminPath(request: FastifyRequest): boolean {
  return isAdminUrl(routedUrl(request));
}

function isAdminUrl(url: string): boolean {
  return url.startsWith('/admin') && (url.length === 6 || url[6] === '/' || url[6] === '?');
}

/**
 * The URL as the router read it. The router decodes percent escapes before it matches, so
 * `/%61dmin/routing` reaches the admin routes: a prefix test on the raw text would leave that
 * admin change, and a refused attempt at it, out of the audit. Decoded here only when there is an
 * escape to decode (a `%2F` becomes a slash, which can only make more requests count as admin or
 * API ones, never fewer).
 */
function routedUrl(request: FastifyRequest): string {
  const url = request.url;
  if (!url.includes('%')) return url;
  try {
    return decodeURIComponent(pathOf(request));
  } catch {
    return url;
  }
}

/**
 * The path of a URL the router could not read, with what escapes it has that stand for ASCII
 * decoded: `/%61dmin/keys/%E0%A4%A` is still an attempt at the admin API.
 */
function unroutedUrl(request: FastifyRequest): string {
  const path = pathOf(request);
  return path.includes('%') ? path.replace(/%[0-7][0-9a-f]/gi, (escape) => String.fromCharCode(Number.parseInt(escape.slice(1), 16))) : path;
}

/**
 * A /v1 error answer the completion pipeline did not audit itself, or an accepted async submit
 * (202: the pipeline runs later, as the job); its payload is read only then.
 */
function unauditedApiAnswer(request: FastifyRequest, status: number): boolean {
  return (status >= 400 || status === 202) && request.completionCall?.audited !== true && isApiPath(request);
}

function isApiPath(request: FastifyRequest): boolean {
  return isApiUrl(routedUrl(request));
}

function isApiUrl(url: string): boolean {
  return url.startsWith('/v1') && (url.length === 3 || url[3] === '/' || url[3] === '?');
}

function pathOf(request: FastifyRequest): string {
  const q = request.url.indexOf('?');
  return q === -1 ? request.url : request.url.slice(0, q);
}

/** `/admin/keys/:id` → `keys`; `/admin/rate-limits/:scope/:id` → `rate-limits`. */
function targetTypeOf(pattern: string): string | null {
  const segment = pattern.split('/')[2];
  return segment && !segment.startsWith(':') ? segment : null;
}

/** Error code and message of a failure, or the whitelisted identifiers of what a change produced. */
function readOutcome(status: number, payload: unknown): Record<string, unknown> {
  if (typeof payload !== 'string' || payload.length === 0 || payload.length > MAX_PARSED_PAYLOAD) return {};
  let body: unknown;
  try {
    body = JSON.parse(payload);
  } catch {
    return {};
  }
  if (typeof body !== 'object' || body === null) return {};
  if (status >= 400) {
    const error = (body as { error?: Record<string, unknown> }).error;
    if (typeof error !== 'object' || error === null) return {};
    return {
      error: {
        code: scalar(error.code) ?? null,
        type: scalar(error.type) ?? null,
        param: scalar(error.param) ?? null,
        message: typeof error.message === 'string' ? redactText(error.message) : null,
      },
    };
  }
  const picked: Record<string, unknown> = {};
  for (const field of RESULT_FIELDS) {
    const value = scalar((body as Record<string, unknown>)[field]);
    if (value !== undefined) picked[field] = value;
  }
  return Object.keys(picked).length > 0 ? { result: picked } : {};
}

function scalar(value: unknown): string | undefined {
  return typeof value === 'string' || typeof value === 'number' ? String(value) : undefined;
}

function stringRecord(value: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (typeof value !== 'object' || value === null) return out;
  for (const [k, v] of Object.entries(value)) if (typeof v === 'string') out[k] = redactText(v);
  return out;
}

/** What a refused caller tried to set, without the values: the body's top-level names, redacted and capped. */
function fieldNames(body: unknown): string[] | undefined {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return undefined;
  const names = Object.keys(body);
  const out = names.slice(0, MAX_BODY_FIELDS).map((name) => cleanString(redactText(name), MAX_FIELD_NAME));
  if (names.length > MAX_BODY_FIELDS) out.push(`[${names.length - MAX_BODY_FIELDS} more]`);
  return out;
}

function hasKeys(value: unknown): boolean {
  return typeof value === 'object' && value !== null && Object.keys(value).length > 0;
}
