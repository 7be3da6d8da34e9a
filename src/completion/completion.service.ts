import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { AuditService } from '../audit/audit.service.js';
import { BudgetService } from '../budget/budget.service.js';
import type { Reservation, Settlement } from '../budget/budget.types.js';
import { type CachedAnswer, type CacheTicket, CompletionCache } from '../cache/completion-cache.service.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger, requestLineLogger } from '../core/logger.js';
import { ShutdownService } from '../lifecycle/shutdown.service.js';
import { GatewayMetrics } from '../metrics/gateway-metrics.js';
import { RateLimiter } from '../rate-limit/rate-limiter.service.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { RoutingService } from '../routing/routing.service.js';
import { UpstreamInfo } from '../upstream/llm-client.js';
import { PricingService } from '../upstream/pricing/pricing.service.js';
import { upstreamToGatewayError } from '../upstream/upstream-errors.js';
import {
  answeredStatus,
  type CacheStatus,
  type CompletionCall,
  type CompletionMeta,
  type JsonOutcome,
  type PacedStreamSink,
  type StreamSink,
} from './completion.types.js';
import { producedBytes, StreamTracker } from './stream-tracker.js';
import { requestedMaxTokens } from './upstream-body.js';
import { answeredModel, asFailure, type Attempt, headerSafeModel, type OpenedStream, type RetryGate, UpstreamCaller } from './upstream-caller.js';

/**
 * The one pipeline every door calls (HTTP JSON, HTTP SSE, /v1/complete):
 *
 *   route → upstream (fallbacks before the first byte) → response → log
 *
 * Stages of the other features slot in around the upstream call, each behind its own port:
 * rate limit and cache read before it, budget reserve right before it, settle / cache write /
 * ledger after it. The upstream chain walk itself lives in UpstreamCaller.
 */
@Injectable()
export class CompletionService {
  private readonly logger: Logger;
  /** The per-request lines: fields the gateway picks itself (requestLineLogger). */
  private readonly lines: Logger;

  constructor(
    private readonly routing: RoutingService,
    private readonly upstream: UpstreamCaller,
    private readonly upstreamInfo: UpstreamInfo,
    private readonly budget: BudgetService,
    private readonly cache: CompletionCache,
    private readonly rateLimiter: RateLimiter,
    private readonly audit: AuditService,
    private readonly metrics: GatewayMetrics,
    private readonly shutdown: ShutdownService,
    private readonly pricing: PricingService,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Completion' });
    this.lines = requestLineLogger(appLogger.logger, { context: 'Completion' });
  }

  /**
   * Before a retry or fallback after a failed attempt that reported usage: the budget holds what
   * it was charged on top of the reservation, or the call ends there (BudgetService.topUp). One
   * function for every call, the reservation its context.
   */
  private readonly topUp: RetryGate<Reservation> = (reservation, attempts) => this.budget.topUp(reservation, attempts);

  /** A model the gateway has a price for (metrics label only such caller-named models). */
  private readonly knownModel = (model: string): boolean => this.pricing.priceOf(model).source !== 'fallback';

  resolve(call: CompletionCall): ResolvedRoute {
    return this.routing.resolve({
      taskType: call.taskType,
      model: call.body.model,
      models: Array.isArray(call.body.models) ? (call.body.models as string[]) : undefined,
      maxTokens: requestedMaxTokens(call),
      departmentId: call.principal.departmentId,
    });
  }

  async complete(call: CompletionCall): Promise<JsonOutcome> {
    const started = performance.now();
    const route = this.resolve(call);
    // Cache: a hit answers here, free; an identical request in flight is waited for (singleflight).
    const cached = await this.admitAndOpen(call, route, started);
    if (cached.hit) return this.answerFromCache(call, route, cached.hit, started);
    const attempts: Attempt[] = [];
    const { reservation, value } = await this.reserveAndCall(call, route, cached, attempts, started, (held) =>
      this.upstream.json(call, route, attempts, this.topUp, held),
    );
    const { model, result } = value;
    const { costNanos, tokens } = this.settleOrAbandon(cached, () => {
      // Read only without usage: content, reasoning, refusal and tool-call arguments all cost tokens.
      const produced = result.completion.choices.reduce((n, c) => n + producedBytes(c.message), 0);
      return this.budget.settle(reservation, attempts, { producedBytes: produced });
    });
    const meta = this.meta(route, model, cached.status);
    // The cost header needs the settlement; the rest waits until the caller has its answer.
    this.afterReply(call, () => {
      // Not awaited: it never throws, and the local followers are released synchronously inside.
      void cached.fill(result.raw, result.completion, attempts.at(-1)?.model);
      this.rateLimiter.recordTokens(call.principal, tokens);
      this.logDone(call, route, meta, attempts, started, 'ok', costNanos);
    });
    return { completion: result.completion, raw: result.raw, costNanos, meta };
  }

  /**
   * Streams to `sink`. Fallbacks happen only until the first upstream event; once the sink is
   * open, a failure becomes an SSE error event followed by [DONE] (API.md "Decisions").
   */
  async stream(call: CompletionCall, sink: StreamSink): Promise<void> {
    const started = performance.now();
    const route = this.resolve(call);
    const cached = await this.admitAndOpen(call, route, started);
    if (cached.hit) return this.replayFromCache(call, route, cached.hit, sink, started);
    // A stream still open when the shutdown drain's deadline passes is ended in-band (its signal
    // fires). A replay ends at once and skips it.
    this.shutdown.drainable(call);
    try {
      await this.streamFromUpstream(call, route, cached, sink, started);
    } finally {
      this.shutdown.drained(call);
    }
  }

  private async streamFromUpstream(call: CompletionCall, route: ResolvedRoute, cached: CacheTicket, sink: StreamSink, started: number): Promise<void> {
    const attempts: Attempt[] = [];
    const { reservation, value: opened } = await this.reserveAndCall(call, route, cached, attempts, started, (held) =>
      this.upstream.stream(call, route, attempts, this.topUp, held),
    );

    // First byte: from here on the client owns a stream and there is no going back.
    const meta = this.meta(route, opened.model, cached.status);
    // Recorded below whatever happens to the stream; said now, before the response can finish,
    // so the door's hooks never log or audit it themselves.
    call.audited = true;
    try {
      sink.open(meta);
    } catch (error) {
      await this.abandonUnopened(call, route, cached, reservation, attempts, opened, started, error);
      throw error;
    }
    this.metrics.streamOpened();
    const clientWantsUsage = call.body.stream_options?.include_usage === true;
    // Parsed events are assembled for the cache only when it will store them.
    const tracker = new StreamTracker(cached.fills);
    const paced = pacedSink(sink);
    let outcome = 'ok';
    let failedStatus: number | undefined;
    // What the upstream said the stream used when it reported its failure (its error event's usage).
    let failedUsage: Attempt['usage'];
    try {
      const events = opened.events;
      let next = opened.first;
      while (!next.done) {
        // The driver's parse of this very event, so the tracker does not parse it again.
        const isUsageOnly = tracker.observe(events.parsed(next.value));
        if (!isUsageOnly || clientWantsUsage) sink.event(next.value);
        // A client far behind the upstream: pull nothing more until its socket drains, so the rest
        // waits upstream (TCP back-pressure), not in this process. The wait also ends when the client
        // leaves or stalls (`closed`, below) or the call's signal aborts (shutdown: the upstream reads then fail).
        if (paced?.backedUp) await paced.drained(call.signal);
        if (sink.closed) {
          outcome = 'client_closed';
          await opened.iterator.return?.();
          break;
        }
        next = await opened.iterator.next();
      }
      if (outcome === 'ok') sink.close();
    } catch (error) {
      const failure = asFailure(error);
      // The caller left while the next event was awaited: its leaving aborted the upstream read.
      // Said as client_closed, as when it is seen between events, not as the shutdown's 'aborted'.
      outcome = failure.kind === 'aborted' && sink.closed ? 'client_closed' : failure.kind;
      // An error event the upstream sent after the first byte names its own status.
      if (failure.kind === 'http') failedStatus = failure.status;
      failedUsage = failure.usage;
      try {
        if (!sink.closed) {
          const mapped = this.shutdown.streamEndedError() ?? upstreamToGatewayError(failure, opened.model);
          sink.event(JSON.stringify(mapped.toEnvelope()));
          sink.close();
        }
      } catch (sinkError) {
        // The client's response broke too: nothing more reaches it, and the call is still settled below.
        this.logger.warn({ reqId: call.requestId, err: (sinkError as Error).message }, 'ending a failed stream failed');
      }
    }
    this.metrics.streamClosed();
    const usage = failedUsage ?? tracker.usage;
    attempts.push({
      // Priced as the model asked for; the upstream's name for it is only shown (meta.model).
      model: opened.pricedModel,
      ok: outcome === 'ok',
      status: failedStatus ?? 200,
      failure: outcome === 'ok' ? undefined : outcome,
      latencyMs: performance.now() - opened.startedAt,
      usage,
      // Its bytes reached the caller even when the stream broke later (charged for what was produced).
      counted: true,
    });
    // Ended, cut or abandoned: charged for what was produced (usage if reported, else an estimate).
    // The characters matter only without usage; counting them would parse events the tracker skipped.
    const { costNanos, tokens } = this.settleOrAbandon(cached, () =>
      this.budget.settle(reservation, attempts, { producedBytes: usage ? undefined : tracker.contentBytes }),
    );
    // The tokens charged, not only those reported: a stream cut before its usage frame counts too.
    // Counted before the cache fill's wait, so the caller's next request already sees them.
    this.rateLimiter.recordTokens(call.principal, tokens);
    // Only a stream that completed is cached (as the assembled completion); a cut one never.
    if (outcome === 'ok') await cached.fillFromStream(tracker.completion(), opened.pricedModel);
    else cached.abandon();
    this.logDone(call, route, meta, attempts, started, outcome, costNanos);
  }

  /**
   * A stream whose sink could not open (its headers refused, say): nothing reached the client, so
   * the upstream stream is stopped, the reservation released (the attempt failed, without usage:
   * free), the cache ticket given up and the call recorded, before the error goes to the door.
   */
  private async abandonUnopened(
    call: CompletionCall,
    route: ResolvedRoute,
    cached: CacheTicket,
    reservation: Reservation,
    attempts: Attempt[],
    opened: OpenedStream,
    started: number,
    error: unknown,
  ): Promise<void> {
    cached.abandon();
    attempts.push({
      model: opened.pricedModel,
      ok: false,
      status: 200,
      failure: 'sink_failed',
      latencyMs: performance.now() - opened.startedAt,
      usage: undefined,
      counted: false,
    });
    try {
      this.budget.settle(reservation, attempts);
    } finally {
      this.logDone(call, route, undefined, attempts, started, error instanceof GatewayError ? error.code : 'internal_error');
      await opened.iterator.return?.().catch(() => undefined);
    }
  }

  /**
   * The door's rate-limit verdict (when it is still in flight) and the cache lookup are issued
   * in the same event-loop turn, so on Redis both leave in one write. Nothing takes effect before
   * the verdict: a refused call releases what the lookup took (a singleflight slot) and throws
   * the 429; a hit is only answered once the call was admitted.
   */
  private async admitAndOpen(call: CompletionCall, route: ResolvedRoute, started: number): Promise<CacheTicket> {
    const opening = this.cache.open(call, route);
    if (call.admission) {
      // Handled here at once: the lookup may settle while the verdict is still on its way.
      opening.catch(() => undefined);
      try {
        await call.admission;
      } catch (error) {
        void opening.then(
          (ticket) => ticket.abandon(),
          () => undefined,
        );
        this.recordRefusal(call, route, started, error);
        throw error;
      }
    }
    return opening;
  }

  /**
   * Budget: the worst case is held on user and department right before the upstream (402/503
   * here), and topped up before a retry that follows a billed failure (topUp). If no attempt
   * succeeds, the reservation is settled for what the attempts cost, the singleflight slot is
   * released for waiters, and the failure is logged before it propagates.
   */
  private async reserveAndCall<T>(
    call: CompletionCall,
    route: ResolvedRoute,
    cached: CacheTicket,
    attempts: Attempt[],
    started: number,
    upstreamCall: (reservation: Reservation) => Promise<T>,
  ): Promise<{ reservation: Reservation; value: T }> {
    const reservation = await this.budget.reserve(call, route, cached.status).catch((error: unknown) => {
      cached.abandon();
      this.recordRefusal(call, route, started, error);
      throw error;
    });
    try {
      return { reservation, value: await upstreamCall(reservation) };
    } catch (error) {
      cached.abandon();
      // Failed attempts may still be charged what they reported using: counted as they are charged.
      this.rateLimiter.recordTokens(call.principal, this.budget.settle(reservation, attempts).tokens);
      this.logDone(call, route, undefined, attempts, started, errorCode(error));
      throw error;
    }
  }

  /**
   * Settles after the upstream answered. Should that throw, the cache ticket is given up before
   * the error leaves: a leader's ticket left open would keep its key's flight, and every identical
   * call after it would wait out its bound before calling the upstream alone.
   */
  private settleOrAbandon(cached: CacheTicket, settle: () => Settlement): Settlement {
    try {
      return settle();
    } catch (error) {
      cached.abandon();
      throw error;
    }
  }

  /** A cache hit: no upstream call, no reservation; charged 0 and recorded as such in the ledger. */
  private answerFromCache(call: CompletionCall, route: ResolvedRoute, hit: CachedAnswer, started: number): JsonOutcome {
    const meta = this.meta(route, headerSafeModel(hit.model, route.models[0]), 'hit', recordedModelOfHit(route, hit));
    // Recorded before the answer, unlike a miss: deferred, the hit cost 14% more CPU at 16
    // connections (paired over 6 rounds, every round dearer) and answered no sooner at one.
    this.budget.recordCacheHit(call, route, meta.recordedModel as string, hit.usage);
    this.logDone(call, route, meta, [], started, 'ok');
    // The chat door sends `raw`; only /v1/complete and jobs read the parsed completion.
    return {
      get completion() {
        return hit.completion;
      },
      raw: hit.raw,
      costNanos: 0n,
      meta,
    };
  }

  /** A cached answer replayed as the SSE a live stream would send. */
  private replayFromCache(call: CompletionCall, route: ResolvedRoute, hit: CachedAnswer, sink: StreamSink, started: number): void {
    const meta = this.meta(route, headerSafeModel(hit.model, route.models[0]), 'hit', recordedModelOfHit(route, hit));
    this.budget.recordCacheHit(call, route, meta.recordedModel as string, hit.usage);
    sink.open(meta);
    // No back-pressure wait: a replay is the cached answer, already in memory and bounded by its
    // size, and it leaves in this tick as one write (see ReplyStreamSink).
    for (const payload of hit.replay(call.body.stream_options?.include_usage === true)) sink.event(payload);
    sink.close();
    this.logDone(call, route, meta, [], started, 'ok');
  }

  /**
   * Runs a JSON miss's bookkeeping (cache fill, token count, ledger row, audit event, metrics,
   * log line) after the door has written the answer: the door sends it in this call's promise
   * continuation, and setImmediate runs only after the turn's continuations, so at one
   * connection the caller no longer waits for records it never sees. Still before the
   * next request is read (the check phase comes before the next poll), so a Redis fill leaves
   * ahead of the next lookup on the same connection. Nothing is lost at shutdown either: the
   * drain and the writers' last flush take many turns after this one.
   */
  private afterReply(call: CompletionCall, work: () => void): void {
    // The audit hook must see it even if the door's reply goes out first and fails.
    call.audited = true;
    setImmediate(() => {
      try {
        work();
      } catch (error) {
        this.logger.error({ reqId: call.requestId, err: (error as Error).message }, 'recording a completion failed');
      }
    });
  }

  private meta(route: ResolvedRoute, model: string, cache: CacheStatus, recordedModel?: string): CompletionMeta {
    return { model, recordedModel, route, cache, upstreamMock: this.upstreamInfo.mock, headers: {} };
  }

  /**
   * A call turned away before the upstream (429 over a rate limit, 402 over a budget, 503 when the
   * budget cannot be checked): audited like any other outcome, so every request leaves a row.
   * Not counted in the completion metrics: the HTTP metrics count refusals by reason. A job's
   * try has no HTTP response, so its refusal is counted here.
   */
  private recordRefusal(call: CompletionCall, route: ResolvedRoute, started: number, error: unknown): void {
    const outcome = errorCode(error);
    if (call.door === 'job') this.metrics.jobRefused(call, route, started, outcome, this.knownModel);
    this.audit.recordCompletion(call, route, undefined, [], outcome);
    call.audited = true;
    if (this.lines.isLevelEnabled('info')) {
      this.lines.info(
        {
          reqId: call.requestId,
          door: call.door,
          status: answeredStatus(undefined, outcome),
          user: call.principal.userId,
          keyPrefix: call.principal.keyPrefix,
          ms: Math.round(performance.now() - started),
          outcome,
        },
        'completion refused',
      );
    }
  }

  private logDone(
    call: CompletionCall,
    route: ResolvedRoute,
    meta: CompletionMeta | undefined,
    attempts: Attempt[],
    started: number,
    outcome: string,
    costNanos = 0n,
  ): void {
    this.metrics.completion(call, route, meta, attempts, started, outcome, costNanos, this.knownModel);
    // Buffered only: the batched audit writer stores it off the request path.
    this.audit.recordCompletion(call, route, meta, attempts, outcome, costNanos);
    call.audited = true;
    // Building the line costs more than the rest of this method: skip it below info.
    if (!this.lines.isLevelEnabled('info')) return;
    const last = attempts.at(-1);
    this.lines.info(
      {
        reqId: call.requestId,
        door: call.door,
        status: answeredStatus(meta, outcome),
        user: call.principal.userId,
        department: call.principal.departmentId,
        keyPrefix: call.principal.keyPrefix,
        task: route.requestedTaskType,
        rule: route.ruleTaskType,
        routingVersion: route.version,
        model: meta?.model,
        cache: meta?.cache,
        attempts: attempts.map((a) => `${a.model}:${a.ok ? 'ok' : (a.failure ?? 'failed')}${a.status ? `:${a.status}` : ''}`),
        promptTokens: last?.usage?.prompt_tokens,
        completionTokens: last?.usage?.completion_tokens,
        ms: Math.round(performance.now() - started),
        outcome,
      },
      'completion',
    );
  }
}

/** Asked once per stream, so each event costs the loop one property read. */
function pacedSink(sink: StreamSink): PacedStreamSink | undefined {
  return 'drained' in sink ? (sink as PacedStreamSink) : undefined;
}

function errorCode(error: unknown): string {
  return typeof error === 'object' && error !== null && typeof (error as { code?: unknown }).code === 'string' ? (error as { code: string }).code : 'error';
}

/**
 * The model a hit is counted under (ledger, metrics): the one its miss was recorded as, kept in
 * the entry, not the upstream's own name for it (a dated version such as
 * `openai/gpt-4o-mini-2024-07-18`), which would split one model's usage into two rows. An entry
 * written before that was kept is mapped onto the route's chain as a native chain's answer is.
 */
function recordedModelOfHit(route: ResolvedRoute, hit: CachedAnswer): string {
  return hit.recordedModel ?? answeredModel({ model: route.models[0], chain: route.models }, hit.model);
}
