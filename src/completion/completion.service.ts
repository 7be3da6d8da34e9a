import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { errorEnvelope, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { RoutingService } from '../routing/routing.service.js';
import { LlmClient, UpstreamFailure, UpstreamInfo } from '../upstream/llm-client.js';
import { isRetryable, upstreamToGatewayError } from '../upstream/upstream-errors.js';
import type { CompletionCall, CompletionMeta, JsonOutcome, StreamSink } from './completion.types.js';

/** One upstream attempt, kept so cost and audit can charge and explain every try (issue #4/#5). */
export interface Attempt {
  model: string;
  ok: boolean;
  status: number | undefined;
  failure: string | undefined;
  latencyMs: number;
  usage: Usage | undefined;
}

// Gateway extensions in the OpenAI body; never forwarded to an upstream that does not know them.
const GATEWAY_FIELDS = ['task_type', 'models', 'route', 'callback_url'] as const;

/**
 * The one pipeline every door calls (HTTP JSON, HTTP SSE, /v1/complete, the queue worker):
 * route → upstream with fallbacks → response, with the stages of later issues (rate limit,
 * cache, budget, audit) slotting in around the upstream call.
 */
@Injectable()
export class CompletionService {
  private readonly logger: Logger;

  constructor(
    private readonly routing: RoutingService,
    private readonly llm: LlmClient,
    private readonly upstreamInfo: UpstreamInfo,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Completion' });
  }

  resolve(call: CompletionCall): ResolvedRoute {
    return this.routing.resolve({
      taskType: call.taskType,
      model: call.body.model,
      models: Array.isArray(call.body.models) ? (call.body.models as string[]) : undefined,
      maxTokens: requestedMaxTokens(call),
    });
  }

  async complete(call: CompletionCall): Promise<JsonOutcome> {
    const started = performance.now();
    const route = this.resolve(call);
    const attempts: Attempt[] = [];
    let lastFailure: { failure: UpstreamFailure; model: string } | undefined;
    for (const model of route.models) {
      const t0 = performance.now();
      try {
        const result = await this.llm.complete({ body: upstreamBody(call, route, model, false), requestId: call.requestId, signal: call.signal });
        const usage = readUsage(result.completion);
        attempts.push({ model, ok: true, status: 200, failure: undefined, latencyMs: performance.now() - t0, usage });
        const meta = this.meta(route, result.completion.model || model);
        this.logDone(call, route, meta, attempts, started, 'ok');
        return { completion: result.completion, raw: result.raw, costNanos: 0n, meta };
      } catch (error) {
        const failure = asFailure(error);
        attempts.push({ model, ok: false, status: failure.status, failure: failure.kind, latencyMs: performance.now() - t0, usage: undefined });
        lastFailure = { failure, model };
        if (!isRetryable(failure) || call.signal.aborted) break;
      }
    }
    const mapped = lastFailure ? upstreamToGatewayError(lastFailure.failure, lastFailure.model) : new GatewayError('upstream_error', 'No model to call.');
    this.logDone(call, route, undefined, attempts, started, mapped.code);
    throw mapped;
  }

  /**
   * Streams to `sink`. Fallbacks happen only until the first upstream event; once the sink is
   * open, a failure becomes an SSE error event followed by [DONE] (API.md "Decisions").
   */
  async stream(call: CompletionCall, sink: StreamSink): Promise<void> {
    const started = performance.now();
    const route = this.resolve(call);
    const attempts: Attempt[] = [];
    const clientWantsUsage = call.body.stream_options?.include_usage === true;
    let lastFailure: { failure: UpstreamFailure; model: string } | undefined;
    for (const model of route.models) {
      const t0 = performance.now();
      let iterator: AsyncIterator<string>;
      let first: IteratorResult<string>;
      try {
        const events = await this.llm.stream({ body: upstreamBody(call, route, model, true), requestId: call.requestId, signal: call.signal });
        iterator = events[Symbol.asyncIterator]();
        first = await iterator.next();
      } catch (error) {
        const failure = asFailure(error);
        attempts.push({ model, ok: false, status: failure.status, failure: failure.kind, latencyMs: performance.now() - t0, usage: undefined });
        lastFailure = { failure, model };
        if (!isRetryable(failure) || call.signal.aborted) break;
        continue;
      }

      // First byte: from here on the client owns a stream and there is no going back.
      const meta = this.meta(route, model);
      sink.open(meta);
      const tracker = new StreamTracker();
      let outcome = 'ok';
      try {
        let next = first;
        while (!next.done) {
          const payload = next.value;
          const isUsageOnly = tracker.observe(payload);
          if (!isUsageOnly || clientWantsUsage) sink.event(payload);
          if (sink.closed) {
            outcome = 'client_closed';
            await iterator.return?.();
            break;
          }
          next = await iterator.next();
        }
        if (outcome === 'ok') sink.close();
      } catch (error) {
        const failure = asFailure(error);
        outcome = failure.kind;
        if (!sink.closed) {
          const mapped = upstreamToGatewayError(failure, model);
          sink.event(JSON.stringify(errorEnvelope(mapped.message, mapped.type, mapped.code)));
          sink.close();
        }
      }
      attempts.push({ model: tracker.model ?? model, ok: outcome === 'ok', status: 200, failure: outcome === 'ok' ? undefined : outcome, latencyMs: performance.now() - t0, usage: tracker.usage });
      this.logDone(call, route, meta, attempts, started, outcome);
      return;
    }
    const mapped = lastFailure ? upstreamToGatewayError(lastFailure.failure, lastFailure.model) : new GatewayError('upstream_error', 'No model to call.');
    this.logDone(call, route, undefined, attempts, started, mapped.code);
    throw mapped;
  }

  private meta(route: ResolvedRoute, model: string): CompletionMeta {
    return { model, route, cache: 'bypass', upstreamMock: this.upstreamInfo.mock, headers: {} };
  }

  private logDone(call: CompletionCall, route: ResolvedRoute, meta: CompletionMeta | undefined, attempts: Attempt[], started: number, outcome: string): void {
    const last = attempts.at(-1);
    this.logger.info(
      {
        reqId: call.requestId,
        door: call.door,
        user: call.principal.userId,
        department: call.principal.departmentId,
        key: call.principal.keyPrefix,
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

function asFailure(error: unknown): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  return new UpstreamFailure('connection', (error as Error).message ?? 'unknown upstream error');
}

export function requestedMaxTokens(call: CompletionCall): number | undefined {
  const v = call.body.max_completion_tokens ?? call.body.max_tokens;
  return typeof v === 'number' ? v : undefined;
}

/** The body the upstream gets: the client's, minus gateway fields, with model and cap decided. */
export function upstreamBody(call: CompletionCall, route: ResolvedRoute, model: string, stream: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = { ...call.body };
  for (const field of GATEWAY_FIELDS) delete body[field];
  body.model = model;
  // Keep the client's choice of parameter name; newer OpenAI models reject max_tokens.
  if (body.max_completion_tokens !== undefined) body.max_completion_tokens = route.maxTokens;
  else body.max_tokens = route.maxTokens;
  if (stream) {
    body.stream = true;
    // Always ask for usage so cuts and completions are charged exactly; the usage-only chunk
    // is passed on only to clients that asked for it themselves.
    body.stream_options = { ...(call.body.stream_options ?? {}), include_usage: true };
  } else {
    delete body.stream;
    delete body.stream_options;
  }
  return body;
}

/** Reads what a stream produced: usage when the upstream reports it, else a content count. */
export class StreamTracker {
  usage: Usage | undefined;
  model: string | undefined;
  contentChars = 0;
  readonly payloads: string[] = [];

  /** Returns true when the payload is the usage-only chunk (no choices). */
  observe(payload: string): boolean {
    this.payloads.push(payload);
    let chunk: { model?: unknown; choices?: Array<{ delta?: { content?: unknown } }>; usage?: unknown };
    try {
      chunk = JSON.parse(payload) as typeof chunk;
    } catch {
      return false;
    }
    if (typeof chunk.model === 'string') this.model = chunk.model;
    const choices = chunk.choices;
    if (Array.isArray(choices)) {
      for (const choice of choices) {
        const content = choice.delta?.content;
        if (typeof content === 'string') this.contentChars += content.length;
      }
    }
    const usage = chunk.usage ? readUsage(chunk) : undefined;
    if (usage) this.usage = usage;
    return usage !== undefined && Array.isArray(choices) && choices.length === 0;
  }
}
