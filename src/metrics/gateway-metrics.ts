import { Injectable } from '@nestjs/common';
import { type Attributes, context, SpanStatusCode, type Tracer, trace } from '@opentelemetry/api';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { MetricService } from 'nestjs-otel';
import { answeredStatus, type CompletionCall, type CompletionMeta } from '../completion/completion.types.js';
import type { Attempt } from '../completion/upstream-caller.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { CounterCells } from './counter-cells.js';
import { type HistogramCells, localMetrics } from './histogram-cells.js';
import { Telemetry } from './telemetry.js';

/** Why a caller was turned away, by the status only that refusal uses (ERROR_TABLE). */
const REJECTIONS: Readonly<Record<number, string>> = { 401: 'auth', 402: 'budget', 403: 'forbidden', 429: 'rate_limit' };

const UPSTREAM_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120];
const HTTP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

/** The gateway's instruments; one set per process, like the OpenTelemetry meter they live in. */
interface Instruments {
  readonly requests: CounterCells;
  readonly rejected: CounterCells;
  readonly tokens: CounterCells;
  readonly costNanos: CounterCells;
  readonly budgetHolds: CounterCells;
  readonly streams: { open: number };
  readonly upstreamDuration: HistogramCells;
  readonly httpDuration: HistogramCells;
}

const SLOT = Symbol.for('gatehouse.metrics.instruments');
type Slot = { [SLOT]?: Instruments };

/**
 * What the gateway records, with instruments created once up front so the hot path only adds
 * numbers: counters are `CounterCells` read at scrape time, the two latency histograms
 * `HistogramCells` the exporter reads as a metric producer; no OpenTelemetry call is made per
 * request. Spans are made only when a tracer exists (OTEL_EXPORTER_OTLP_ENDPOINT).
 */
@Injectable()
export class GatewayMetrics {
  private readonly i: Instruments;
  private readonly tracer: Tracer | undefined;

  constructor(metricService: MetricService, telemetry: Telemetry) {
    this.i = instruments(metricService);
    this.tracer = telemetry.tracer;
  }

  /** One finished pipeline call (from CompletionService.logDone): answer, refusal or failure. */
  completion(
    call: CompletionCall,
    route: ResolvedRoute,
    meta: CompletionMeta | undefined,
    attempts: readonly Attempt[],
    started: number,
    outcome: string,
    costNanos: bigint,
    knownModel: (model: string) => boolean,
  ): void {
    // Labelled as the model the gateway asked for (as the ledger records it), not the upstream's own name for it.
    const model = modelLabel(route, meta?.recordedModel ?? attempts.at(-1)?.model ?? route.models[0] ?? 'none', knownModel);
    const status = answeredStatus(meta, outcome);
    this.i.requests.add([call.door, String(status), model, meta?.cache ?? 'none', outcome], 1);
    for (const attempt of attempts) {
      const label = attempt.model === model ? model : modelLabel(route, attempt.model, knownModel);
      this.i.upstreamDuration.record([label, attemptOutcome(attempt)], attempt.latencyMs / 1000);
      if (attempt.usage) {
        this.i.tokens.add([label, 'prompt'], attempt.usage.prompt_tokens);
        this.i.tokens.add([label, 'completion'], attempt.usage.completion_tokens);
      }
    }
    if (costNanos > 0n) this.i.costNanos.add([model], Number(costNanos));
    if (this.tracer) this.completionSpan(this.tracer, call, route, meta, attempts, started, outcome, meta?.model ?? model, status);
  }

  /** Every HTTP response (Fastify onResponse): duration by route, and refusals by reason. */
  httpResponse(request: FastifyRequest, reply: FastifyReply, status = reply.statusCode): void {
    this.i.httpDuration.record([request.method, request.routeOptions.url ?? 'unmatched', String(status)], reply.elapsedTime / 1000);
    const reason = REJECTIONS[status];
    if (reason !== undefined) this.i.rejected.add([reason], 1);
  }

  /**
   * A job's try turned away before the upstream. httpResponse counts an HTTP refusal from its
   * status, but a job's try has no response: counted here under the reason its status gives, and
   * one that status names no reason for (a 503: the budget could not be checked) as a job call.
   */
  jobRefused(call: CompletionCall, route: ResolvedRoute, started: number, outcome: string, knownModel: (model: string) => boolean): void {
    const reason = REJECTIONS[answeredStatus(undefined, outcome)];
    if (reason !== undefined) this.i.rejected.add([reason], 1);
    else this.completion(call, route, undefined, [], started, outcome, 0n, knownModel);
  }

  streamOpened(): void {
    this.i.streams.open += 1;
  }

  /**
   * One budget hold: `lease` (a request served from this instance's lease, no statement),
   * `exact` (a request's own reservation statement) or `lease_request` (a lease asked for), each
   * `granted` or `refused`. The share of `exact` says how often requests still pay the round trip.
   */
  budgetHold(path: 'lease' | 'exact' | 'lease_request', outcome: 'granted' | 'refused'): void {
    this.i.budgetHolds.add([path, outcome], 1);
  }

  streamClosed(): void {
    this.i.streams.open -= 1;
  }

  /**
   * Spans after the fact, from what the pipeline measured: no span object exists while the call
   * runs. The parent is the HTTP request's span (active through the preHandler hook). Attempts
   * are laid out backwards from the end: each one's duration is exact, the gaps are the waits.
   */
  private completionSpan(
    tracer: Tracer,
    call: CompletionCall,
    route: ResolvedRoute,
    meta: CompletionMeta | undefined,
    attempts: readonly Attempt[],
    started: number,
    outcome: string,
    model: string,
    status: number,
  ): void {
    const attributes: Attributes = {
      'gatehouse.request_id': call.requestId,
      'gatehouse.door': call.door,
      'gatehouse.outcome': outcome,
      'gatehouse.cache': meta?.cache ?? 'none',
      'gatehouse.routing_version': route.version,
      'gatehouse.task_type': route.ruleTaskType,
      'gatehouse.department_id': call.principal.departmentId,
      'gatehouse.user_id': call.principal.userId,
      'gen_ai.response.model': model,
      'http.response.status_code': status,
    };
    const last = attempts.at(-1);
    if (last?.usage) {
      attributes['gen_ai.usage.input_tokens'] = last.usage.prompt_tokens;
      attributes['gen_ai.usage.output_tokens'] = last.usage.completion_tokens;
    }
    const span = tracer.startSpan('gatehouse.completion', { startTime: started, attributes });
    const parent = trace.setSpan(context.active(), span);
    let end = performance.now();
    for (let n = attempts.length - 1; n >= 0; n--) {
      const attempt = attempts[n];
      if (attempt === undefined) continue;
      const start = Math.max(started, end - attempt.latencyMs);
      const child = tracer.startSpan(
        'gatehouse.upstream_attempt',
        {
          startTime: start,
          attributes: { 'gen_ai.request.model': attempt.model, 'gatehouse.outcome': attemptOutcome(attempt), 'gatehouse.try': attempt.try ?? 1 },
        },
        parent,
      );
      if (!attempt.ok) child.setStatus({ code: SpanStatusCode.ERROR, message: attemptOutcome(attempt) });
      child.end(end);
      end = start - (attempt.waitedMs ?? 0);
    }
    if (outcome !== 'ok') span.setStatus({ code: SpanStatusCode.ERROR, message: outcome });
    span.end();
  }
}

/** The `model` label of a model no one configured and the gateway has no price for. */
export const OTHER_MODEL = 'other';

/**
 * A model as a metric label. The routing table's models are the admins' choice, so bounded; a
 * model the caller named (`model`, or its own `models` fallbacks) is a label only when the gateway
 * knows it (priced: the price table, OpenRouter's list, an override). Otherwise one key naming
 * made-up models would open a series per name, fill every instrument's MAX_SERIES and fold
 * everyone's new series into `_overflow` until the process restarts.
 */
function modelLabel(route: ResolvedRoute, model: string, knownModel: (model: string) => boolean): string {
  // With its own `models`, everything but the table's first model (`auto`'s choice) is the
  // caller's; without, only a `model` it named, the first (the fallbacks are the table's).
  const callerChose = route.callerFallbacks === true ? route.explicitModel || model !== route.models[0] : route.explicitModel && model === route.models[0];
  return !callerChose || knownModel(model) ? model : OTHER_MODEL;
}

function attemptOutcome(attempt: Attempt): string {
  if (attempt.ok) return 'ok';
  if (attempt.failure === 'http' && attempt.status !== undefined) return `http_${attempt.status}`;
  return attempt.failure ?? 'failed';
}

function instruments(metricService: MetricService): Instruments {
  const holder = globalThis as Slot;
  const existing = holder[SLOT];
  if (existing) return existing;
  const created: Instruments = {
    requests: new CounterCells(['door', 'status', 'model', 'cache', 'outcome']),
    rejected: new CounterCells(['reason']),
    tokens: new CounterCells(['model', 'type']),
    costNanos: new CounterCells(['model']),
    budgetHolds: new CounterCells(['path', 'outcome']),
    streams: { open: 0 },
    upstreamDuration: localMetrics().histogram({
      name: 'gatehouse_upstream_attempt_duration_seconds',
      description: 'Upstream attempts by model and outcome (ok, timeout, connection, http_<status>, …); a stream attempt lasts until the stream ends',
      unit: 's',
      boundaries: UPSTREAM_BUCKETS_S,
      labels: ['model', 'outcome'],
    }),
    httpDuration: localMetrics().histogram({
      name: 'gatehouse_http_request_duration_seconds',
      description: 'HTTP requests by method, route pattern and status; a stream lasts until its last byte',
      unit: 's',
      boundaries: HTTP_BUCKETS_S,
      labels: ['method', 'route', 'status'],
    }),
  };
  metricService
    .getObservableCounter('gatehouse_requests_total', { description: 'Completion calls by door, status, model, cache result and outcome' })
    .addCallback((result) => created.requests.observe(result));
  metricService
    .getObservableCounter('gatehouse_rejected_requests_total', {
      description: 'Requests refused before any model was called, by reason (auth, budget, forbidden, rate_limit)',
    })
    .addCallback((result) => created.rejected.observe(result));
  metricService
    .getObservableCounter('gatehouse_tokens_total', { description: 'Tokens the upstream reported, by model and type (prompt, completion)' })
    .addCallback((result) => created.tokens.observe(result));
  metricService
    .getObservableCounter('gatehouse_cost_usd_total', { description: 'Cost charged, in USD (summed exactly in integer nano-dollars, exported as a double)' })
    .addCallback((result) => created.costNanos.observe(result, 1e9));
  metricService
    .getObservableCounter('gatehouse_budget_holds_total', {
      description: 'Budget holds by path (lease: served from a lease, no statement; exact: one statement; lease_request: a lease asked for) and outcome',
    })
    .addCallback((result) => created.budgetHolds.observe(result));
  metricService
    .getObservableUpDownCounter('gatehouse_streams_in_flight', { description: 'SSE streams open to clients right now' })
    .addCallback((result) => result.observe(created.streams.open));
  holder[SLOT] = created;
  return created;
}
