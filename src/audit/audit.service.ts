import { randomUUID } from 'node:crypto';
import { type BeforeApplicationShutdown, Injectable, type OnApplicationShutdown, type OnModuleInit, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import { BatchWriter } from '../core/batch-writer.js';
import { Clock } from '../core/clock.js';
import { statusOfCode } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry, type ReadinessReport } from '../health/readiness.js';
import type { Principal } from '../identity/principal.js';
import { ShutdownService } from '../lifecycle/shutdown.service.js';
import {
  type AuditEvent,
  cleanString,
  type JsonObject,
  type JsonValue,
  statusColumn,
  type StoredAuditEvent,
  textColumn,
  toJson,
  uuidColumn,
} from './audit-event.js';
import { type AuditQuery, AuditRepository, type AuditVerifyRange, type AuditVerifyResult } from './audit.repository.js';
import { redactText } from './redact.js';

/** Writer tuning; AuditModule fills it from AppConfig, integration tests pass their own. */
export abstract class AuditOptions {
  /** A flush starts at least this often while events wait. */
  declare readonly flushMs: number;
  /** Events per INSERT (one transaction); a full buffer flushes at once. */
  declare readonly batchSize: number;
  /** Events kept in memory while the database is unreachable; beyond it new events are counted and dropped. */
  declare readonly maxBuffered: number;
  /** Longest wait between failed flushes. */
  declare readonly maxBackoffMs: number;
}

/**
 * What a caller knows about an event; ids, time and clean-up are the service's job. `details` is
 * read when its batch is written, so hand over a fresh object and do not change it afterwards.
 */
export interface AuditRecord {
  principal?: Principal;
  action: string;
  targetType?: string | null;
  targetId?: string | null;
  requestId?: string | null;
  status?: number | null;
  details?: Record<string, unknown>;
}

// Structural views of the pipeline's types: audit is a feature and does not import completion/.
export interface CompletionAuditCall {
  readonly requestId: string;
  readonly principal: Principal;
  readonly door: string;
  /** The OpenAI body; only its `user` label (the end user, never an identity) is kept. */
  readonly body?: object;
}
export interface CompletionAuditRoute {
  readonly requestedTaskType: string;
  readonly ruleTaskType: string;
  readonly version: number;
}
export interface CompletionAuditMeta {
  readonly model: string;
  readonly cache: string;
}
export interface CompletionAuditAttempt {
  readonly model: string;
  readonly ok: boolean;
  readonly status: number | undefined;
  readonly failure: string | undefined;
  readonly latencyMs: number;
  readonly usage?: { readonly prompt_tokens?: number; readonly completion_tokens?: number } | undefined;
}

export interface AuditStats {
  buffered: number;
  written: number;
  dropped: number;
  failing: boolean;
  lastError: string | undefined;
}

interface Pending {
  readonly id: string;
  readonly at: Date;
  readonly input: AuditRecord;
  /** Details already in stored form (built by recordCompletion): used as they are, not sanitised again. */
  readonly storable?: JsonObject;
  event: AuditEvent | undefined;
}

/**
 * Append-only audit trail, kept off the request path: `record*()` only pushes onto an in-memory
 * buffer; a writer flushes it in batches (one chained multi-row INSERT per flush) every
 * `flushMs` or as soon as `batchSize` events wait, and drains it on shutdown.
 *
 * A database outage never fails or slows a request: flushes retry with exponential backoff while
 * the buffer holds up to `maxBuffered` events; past that, events are counted as dropped, logged
 * loudly, and the gap itself is written into the chain once the database is back.
 */
@Injectable()
export class AuditService implements OnModuleInit, BeforeApplicationShutdown, OnApplicationShutdown {
  private readonly logger: Logger;
  private readonly writer: BatchWriter<Pending>;
  /** The last failure may have happened after COMMIT: the next flush skips ids already stored. */
  private ambiguous = false;
  private written = 0;
  private dropped = 0;
  private droppedSinceLastWrite = 0;
  private droppedFrom: Date | undefined;
  private droppedUntil: Date | undefined;
  /** Events recorded after the last flush at shutdown (lost). */
  private lostLate = 0;

  constructor(
    private readonly repository: AuditRepository,
    private readonly clock: Clock,
    appLogger: AppLogger,
    private readonly options: AuditOptions,
    @Optional() private readonly readiness?: ReadinessRegistry,
    @Optional() private readonly shutdown?: ShutdownService,
  ) {
    this.logger = appLogger.logger.child({ context: 'Audit' });
    this.writer = new BatchWriter<Pending>({
      store: (batch) => this.store(batch),
      batchSize: options.batchSize,
      flushMs: options.flushMs,
      maxBackoffMs: options.maxBackoffMs,
      logger: this.logger,
      messages: {
        failed: 'audit flush failed; events kept in memory and retried',
        stillFailing: 'audit flush still failing',
        recovered: 'audit writes recovered',
      },
      beforeBatch: () => {
        if (this.droppedSinceLastWrite > 0 && this.writer.size < this.options.maxBuffered) this.recordGap();
      },
      failed: () => {
        this.ambiguous = true;
      },
      describeError: (error) => cleanString(error instanceof Error ? error.message : String(error), 200),
    });
  }

  onModuleInit(): void {
    this.readiness?.register('audit', () => Promise.resolve(this.report()));
    this.start();
  }

  /**
   * Nest runs this while the HTTP drain runs: what was recorded so far starts on its way now.
   * Not awaited: Nest runs these hooks module by module, and one that waits for a database that
   * does not answer holds every later one (the HTTP server's close, the writers' last flush) past
   * the pod's grace period. Nothing is lost yet if the database refuses: onApplicationShutdown
   * tries again.
   */
  beforeApplicationShutdown(): void {
    void this.writer.flush();
  }

  /** And this after it closed: requests that finished while it closed recorded events too. This is the last chance. */
  async onApplicationShutdown(): Promise<void> {
    this.stop();
    await this.writer.drainForShutdown(this.shutdown?.writeDeadline());
    if (this.writer.size === 0) return;
    this.logger.error({ lost: this.writer.size, lastError: this.writer.lastError }, 'AUDIT EVENTS LOST: shutting down with events the database would not take');
  }

  start(): void {
    this.writer.start();
  }

  stop(): void {
    this.writer.stop();
  }

  /** Buffers one event. Never throws and never waits: audit must not fail or slow a request. */
  record(input: AuditRecord): void {
    // Id and time now; clean-up and hashing later, in the writer, off the request path.
    this.push({ id: randomUUID(), at: this.clock.now(), input, event: undefined });
  }

  /** One event per completion request, whichever door it came through (called once by the pipeline). */
  recordCompletion(
    call: CompletionAuditCall,
    // Undefined for a job try that ended before routing (its key revoked while it waited, say).
    route: CompletionAuditRoute | undefined,
    meta: CompletionAuditMeta | undefined,
    attempts: readonly CompletionAuditAttempt[],
    outcome: string,
    costNanos?: bigint,
  ): void {
    const last = attempts.at(-1);
    const endUser = call.body && 'user' in call.body ? call.body.user : undefined;
    const principal = call.principal;
    // The details record() would hold, in the form toJson would give them at the flush, built
    // here from fields of known types: no walk over the whole object, and keys in canonical order
    // so the hash needs no sort. Every string is still cleaned (the caller supplies end_user,
    // the task type and model names).
    const attemptsJson = attemptsDetail(attempts);
    const cache = toJson(meta?.cache, 1);
    const completionTokens = toJson(last?.usage?.completion_tokens, 1);
    const cost = costNanos === undefined ? null : costNanos.toString();
    const departmentId = toJson(principal.departmentId, 1);
    const door = toJson(call.door, 1);
    const keyPrefix = toJson(principal.keyPrefix, 1);
    const model = toJson(meta?.model, 1);
    const outcomeJson = toJson(outcome, 1);
    const promptTokens = toJson(last?.usage?.prompt_tokens, 1);
    const version = toJson(route?.version, 1);
    const rule = toJson(route?.ruleTaskType, 1);
    const taskType = toJson(route?.requestedTaskType, 1);
    // Two literals rather than a key added later: one shape each, and end_user absent (not null) without a label.
    const details: JsonObject =
      typeof endUser === 'string'
        ? {
            attempts: attemptsJson,
            cache,
            completion_tokens: completionTokens,
            cost_nanos: cost,
            department_id: departmentId,
            door,
            end_user: toJson(redactText(endUser), 1),
            key_prefix: keyPrefix,
            model,
            outcome: outcomeJson,
            prompt_tokens: promptTokens,
            routing_version: version,
            rule,
            task_type: taskType,
          }
        : {
            attempts: attemptsJson,
            cache,
            completion_tokens: completionTokens,
            cost_nanos: cost,
            department_id: departmentId,
            door,
            key_prefix: keyPrefix,
            model,
            outcome: outcomeJson,
            prompt_tokens: promptTokens,
            routing_version: version,
            rule,
            task_type: taskType,
          };
    const input: AuditRecord = {
      principal,
      action: 'completion',
      targetType: 'model',
      targetId: meta?.model ?? last?.model ?? null,
      requestId: call.requestId,
      // Once a stream has started the client got a 200, whatever happened after it.
      status: meta !== undefined ? 200 : (statusOfCode(outcome) ?? null),
    };
    this.push({ id: randomUUID(), at: this.clock.now(), input, storable: details, event: undefined });
  }

  /** Writes everything buffered now (tests, shutdown). Resolves false if the database refused. */
  async flush(): Promise<boolean> {
    return this.writer.flush();
  }

  /** Admin query: newest first, keyset-paginated on seq. */
  list(query: AuditQuery): Promise<{ events: StoredAuditEvent[]; nextCursor: string | null }> {
    return this.repository.list(query);
  }

  /** Recomputes the hash chain over a range; events still buffered are not in it yet. */
  verify(range: AuditVerifyRange): Promise<AuditVerifyResult> {
    return this.repository.verify(range);
  }

  stats(): AuditStats {
    return { buffered: this.writer.size, written: this.written, dropped: this.dropped, failing: this.writer.failures > 0, lastError: this.writer.lastError };
  }

  report(): ReadinessReport {
    return this.writer.report({ buffered: this.writer.size, max_buffered: this.options.maxBuffered, written: this.written, dropped: this.dropped });
  }

  /** Built once per event, so a retried batch hashes exactly what the failed attempt hashed. */
  private materialize(pending: Pending): AuditEvent {
    if (pending.event) return pending.event;
    try {
      pending.event = this.toEvent(pending);
    } catch (error) {
      // A record whose details cannot be read still leaves its trace rather than wedging the batch.
      pending.event = this.toEvent({ ...pending, input: { ...pending.input, details: { audit_error: cleanString(String(error), 200) } } });
    }
    return pending.event;
  }

  private toEvent({ id, at, input, storable }: Pending): AuditEvent {
    const p = input.principal;
    const details = storable ?? toJson({ ...(input.details ?? {}), ...(p ? { key_prefix: p.keyPrefix, department_id: p.departmentId } : {}) });
    return {
      id,
      at,
      actorUserId: uuidColumn(p?.userId),
      actorKeyId: uuidColumn(p?.keyId),
      actorRole: textColumn(p?.role),
      action: cleanString(input.action, 200),
      targetType: textColumn(input.targetType),
      targetId: textColumn(input.targetId),
      requestId: textColumn(input.requestId),
      status: statusColumn(input.status),
      details: details !== null && typeof details === 'object' && !Array.isArray(details) ? details : {},
    };
  }

  private push(event: Pending): void {
    if (this.writer.finished) {
      // Nothing would store it: the last flush is over and the database is closing.
      this.lostLate += 1;
      this.writer.loud('late', () =>
        this.logger.error(
          { lost: this.lostLate, action: event.input.action, requestId: event.input.requestId },
          'AUDIT EVENTS LOST: recorded after the last flush at shutdown',
        ),
      );
      return;
    }
    if (this.writer.size >= this.options.maxBuffered) {
      this.dropped += 1;
      this.droppedSinceLastWrite += 1;
      this.droppedFrom ??= event.at;
      this.droppedUntil = event.at;
      this.writer.loud('dropped', () =>
        this.logger.error(
          { dropped: this.dropped, buffered: this.writer.size, lastError: this.writer.lastError },
          'AUDIT EVENTS DROPPED: the audit buffer is full because the database keeps refusing writes',
        ),
      );
      return;
    }
    this.writer.add(event);
  }

  /** One chained multi-row INSERT; details are materialised once, so a retry hashes what the failed attempt hashed. */
  private async store(pending: readonly Pending[]): Promise<number> {
    await this.repository.append(
      pending.map((p) => this.materialize(p)),
      this.ambiguous,
    );
    this.written += pending.length;
    this.ambiguous = false;
    return pending.length;
  }

  /** The chain records its own gap, so a reviewer sees that events are missing and when. */
  private recordGap(): void {
    const count = this.droppedSinceLastWrite;
    const details = {
      count,
      first_dropped_at: this.droppedFrom?.toISOString(),
      last_dropped_at: this.droppedUntil?.toISOString(),
      reason: 'buffer full while the database refused writes',
    };
    this.droppedSinceLastWrite = 0;
    this.droppedFrom = undefined;
    this.droppedUntil = undefined;
    this.writer.add({ id: randomUUID(), at: this.clock.now(), input: { action: 'audit.events_dropped', targetType: 'audit', details }, event: undefined });
  }

}

/** The attempts as toJson stores them (at most 50, then a count), keys in canonical order. */
function attemptsDetail(attempts: readonly CompletionAuditAttempt[]): JsonValue[] {
  const out: JsonValue[] = [];
  const n = Math.min(attempts.length, 50);
  for (let i = 0; i < n; i++) {
    const a = attempts[i];
    out.push({
      failure: toJson(a.failure, 3),
      model: toJson(a.model, 3),
      ms: toJson(Math.round(a.latencyMs), 3),
      ok: toJson(a.ok, 3),
      status: toJson(a.status, 3),
    });
  }
  if (attempts.length > 50) out.push(`[${attempts.length - 50} more]`);
  return out;
}
