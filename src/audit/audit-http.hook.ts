import { Injectable, type OnModuleInit } from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { AppConfig } from '../config/config.js';
import { wantsAsync } from '../core/prefer.js';
import { keyPrefix } from '../identity/api-key.js';
import { presentedKey } from '../identity/auth.guard.js';
import { AuditService } from './audit.service.js';
import { redactedSummary, redactText } from './redact.js';

const READ_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);
// Response fields worth keeping from a successful change: what was created or which version it
// became. A whitelist, so a created key's secret (`key`) can never be picked up.
const RESULT_FIELDS = ['id', 'prefix', 'version'] as const;
// Parsed only for changes and errors (a read's answer is never looked at): a routing table of many
// rules answers well over 64 KiB, and its new version must still reach the audit row.
const MAX_PARSED_PAYLOAD = 8 * 1024 * 1024;

const outcomes = new WeakMap<FastifyRequest, Record<string, unknown>>();

/**
 * A change whose caller hung up before the answer: an admin change, or an async submit (the job
 * exists and will run). Fastify runs onSend when the handler answers but never onResponse (the
 * response never finished), so the change was made and not audited. `closedEarly`: the
 * connection closed before the handler answered (onSend records); `recorded`: the row is written
 * (onResponse skips).
 */
interface ChangeWatch {
  api: boolean;
  closedEarly: boolean;
  recorded: boolean;
}
const changeWatches = new WeakMap<FastifyRequest, ChangeWatch>();

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

    // Only changes are watched for a caller that leaves (admin changes, async submits): a header
    // test per /v1 request, and no listener on a sync call, which audits itself however it ends.
    fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
      if (!READ_METHODS.has(request.method)) {
        if (isAdminPath(request)) this.watchChange(request, reply, false);
        else if (wantsAsync(request) && isApiPath(request)) this.watchChange(request, reply, true);
      }
      done();
    });
    fastify.addHook('onSend', (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void) => {
      const admin = isAdminPath(request);
      if ((admin && (!READ_METHODS.has(request.method) || reply.statusCode >= 400)) || (!admin && unauditedApiAnswer(request, reply.statusCode))) {
        outcomes.set(request, readOutcome(reply.statusCode, payload));
      }
      const watch = changeWatches.get(request);
      if (watch?.closedEarly === true && !watch.recorded) this.recordLeft(request, reply, watch);
      done(null, payload);
    });
    fastify.addHook('onResponse', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
      const status = reply.statusCode;
      if (changeWatches.get(request)?.recorded === true) {
        // Already recorded as left by its caller.
      } else if (unauditedApiAnswer(request, status)) this.recordApiAnswer(request, status, reply);
      else if (isAdminPath(request) && (!READ_METHODS.has(request.method) || status === 401 || status === 403)) {
        this.recordAdmin(request, status);
      }
      done();
    });
  }

  /**
   * A /v1 answer the pipeline did not audit: who (or which key prefix), what, and the error; or
   * an accepted async submit (202), with the job it made (its tries are audited as the job runs).
   */
  private recordApiAnswer(request: FastifyRequest, status: number, reply?: FastifyReply, clientClosed = false): void {
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

  private watchChange(request: FastifyRequest, reply: FastifyReply, api: boolean): void {
    const watch: ChangeWatch = { api, closedEarly: false, recorded: false };
    changeWatches.set(request, watch);
    reply.raw.once('close', () => {
      if (reply.raw.writableFinished || watch.recorded) return;
      // Answered (onSend ran), then cut while it was written: onResponse will not come.
      if (outcomes.has(request)) this.recordLeft(request, reply, watch);
      else watch.closedEarly = true;
    });
  }

  /** The row of a watched change whose caller left; the status is the handler's. */
  private recordLeft(request: FastifyRequest, reply: FastifyReply, watch: ChangeWatch): void {
    watch.recorded = true;
    if (!watch.api) this.recordAdmin(request, reply.statusCode, true);
    // A sync answer (no async submit after all) was audited by the pipeline.
    else if (unauditedApiAnswer(request, reply.statusCode)) this.recordApiAnswer(request, reply.statusCode, reply, true);
  }

  /** `clientClosed`: the caller left before the answer reached it; the status is the handler's. */
  private recordAdmin(request: FastifyRequest, status: number, clientClosed = false): void {
    const pattern = request.routeOptions.url ?? pathOf(request);
    const params = stringRecord(request.params);
    const outcome = outcomes.get(request) ?? {};
    const result = outcome.result as Record<string, unknown> | undefined;
    const details: Record<string, unknown> = {
      ip: request.ip,
      user_agent: typeof request.headers['user-agent'] === 'string' ? redactText(request.headers['user-agent']) : undefined,
      params: Object.keys(params).length > 0 ? redactedSummary(params) : undefined,
      query: hasKeys(request.query) ? redactedSummary(request.query) : undefined,
      body: READ_METHODS.has(request.method) || request.body === undefined ? undefined : redactedSummary(request.body),
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

function isAdminPath(request: FastifyRequest): boolean {
  const url = routedUrl(request);
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
 * A /v1 error answer the completion pipeline did not audit itself, or an accepted async submit
 * (202: the pipeline runs later, as the job); its payload is read only then.
 */
function unauditedApiAnswer(request: FastifyRequest, status: number): boolean {
  return (status >= 400 || status === 202) && request.completionCall?.audited !== true && isApiPath(request);
}

function isApiPath(request: FastifyRequest): boolean {
  const url = routedUrl(request);
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

function hasKeys(value: unknown): boolean {
  return typeof value === 'object' && value !== null && Object.keys(value).length > 0;
}
