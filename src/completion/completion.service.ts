import { Injectable } from '@nestjs/common';
import type { Logger } from 'pino';
import { errorEnvelope } from '../../libs/openai-contract/src/index.js';
import { AppLogger } from '../core/logger.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { RoutingService } from '../routing/routing.service.js';
import { UpstreamInfo } from '../upstream/llm-client.js';
import { upstreamToGatewayError } from '../upstream/upstream-errors.js';
import type { CompletionCall, CompletionMeta, JsonOutcome, StreamSink } from './completion.types.js';
import { StreamTracker } from './stream-tracker.js';
import { requestedMaxTokens } from './upstream-body.js';
import { asFailure, type Attempt, UpstreamCaller } from './upstream-caller.js';

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

  constructor(
    private readonly routing: RoutingService,
    private readonly upstream: UpstreamCaller,
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
    try {
      const { model, result } = await this.upstream.json(call, route, attempts);
      const meta = this.meta(route, model);
      this.logDone(call, route, meta, attempts, started, 'ok');
      return { completion: result.completion, raw: result.raw, costNanos: 0n, meta };
    } catch (error) {
      this.logDone(call, route, undefined, attempts, started, errorCode(error));
      throw error;
    }
  }

  /**
   * Streams to `sink`. Fallbacks happen only until the first upstream event; once the sink is
   * open, a failure becomes an SSE error event followed by [DONE] (API.md "Decisions").
   */
  async stream(call: CompletionCall, sink: StreamSink): Promise<void> {
    const started = performance.now();
    const route = this.resolve(call);
    const attempts: Attempt[] = [];
    let opened;
    try {
      opened = await this.upstream.stream(call, route, attempts);
    } catch (error) {
      this.logDone(call, route, undefined, attempts, started, errorCode(error));
      throw error;
    }

    // First byte: from here on the client owns a stream and there is no going back.
    const meta = this.meta(route, opened.model);
    sink.open(meta);
    const clientWantsUsage = call.body.stream_options?.include_usage === true;
    const tracker = new StreamTracker();
    let outcome = 'ok';
    try {
      let next = opened.first;
      while (!next.done) {
        const isUsageOnly = tracker.observe(next.value);
        if (!isUsageOnly || clientWantsUsage) sink.event(next.value);
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
      outcome = failure.kind;
      if (!sink.closed) {
        const mapped = upstreamToGatewayError(failure, opened.model);
        sink.event(JSON.stringify(errorEnvelope(mapped.message, mapped.type, mapped.code)));
        sink.close();
      }
    }
    attempts.push({
      model: tracker.model ?? opened.model,
      ok: outcome === 'ok',
      status: 200,
      failure: outcome === 'ok' ? undefined : outcome,
      latencyMs: performance.now() - opened.startedAt,
      usage: tracker.usage,
    });
    this.logDone(call, route, meta, attempts, started, outcome);
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

function errorCode(error: unknown): string {
  return typeof error === 'object' && error !== null && typeof (error as { code?: unknown }).code === 'string' ? (error as { code: string }).code : 'error';
}
