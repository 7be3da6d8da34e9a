import { Injectable } from '@nestjs/common';
import { readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { GatewayError } from '../core/errors.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { LlmClient, UpstreamFailure, type UpstreamJsonResult } from '../upstream/llm-client.js';
import { isRetryable, upstreamToGatewayError } from '../upstream/upstream-errors.js';
import type { CompletionCall } from './completion.types.js';
import { upstreamBody } from './upstream-body.js';

/** One upstream attempt, kept so cost and audit can charge and explain every try. */
export interface Attempt {
  model: string;
  ok: boolean;
  status: number | undefined;
  failure: string | undefined;
  latencyMs: number;
  usage: Usage | undefined;
}

export interface OpenedStream {
  model: string;
  iterator: AsyncIterator<string>;
  /** The first event, already read: proof the upstream is really answering. */
  first: IteratorResult<string>;
  startedAt: number;
}

/**
 * Walks the route's model chain (primary, then fallbacks) until one answers. For streams it
 * stops at the first event: after that, the caller owns the stream and there is no going back.
 * Every attempt is appended to `attempts`, failed or not.
 */
@Injectable()
export class UpstreamCaller {
  constructor(private readonly llm: LlmClient) {}

  async json(call: CompletionCall, route: ResolvedRoute, attempts: Attempt[]): Promise<{ model: string; result: UpstreamJsonResult }> {
    let last: { failure: UpstreamFailure; model: string } | undefined;
    for (const model of route.models) {
      const t0 = performance.now();
      try {
        const result = await this.llm.complete({ body: upstreamBody(call, route, model, false), requestId: call.requestId, signal: call.signal });
        attempts.push({ model, ok: true, status: 200, failure: undefined, latencyMs: performance.now() - t0, usage: readUsage(result.completion) });
        return { model: result.completion.model || model, result };
      } catch (error) {
        const failure = asFailure(error);
        attempts.push({ model, ok: false, status: failure.status, failure: failure.kind, latencyMs: performance.now() - t0, usage: undefined });
        last = { failure, model };
        if (!isRetryable(failure) || call.signal.aborted) break;
      }
    }
    throw finalError(last);
  }

  async stream(call: CompletionCall, route: ResolvedRoute, attempts: Attempt[]): Promise<OpenedStream> {
    let last: { failure: UpstreamFailure; model: string } | undefined;
    for (const model of route.models) {
      const t0 = performance.now();
      try {
        const events = await this.llm.stream({ body: upstreamBody(call, route, model, true), requestId: call.requestId, signal: call.signal });
        const iterator = events[Symbol.asyncIterator]();
        const first = await iterator.next();
        return { model, iterator, first, startedAt: t0 };
      } catch (error) {
        const failure = asFailure(error);
        attempts.push({ model, ok: false, status: failure.status, failure: failure.kind, latencyMs: performance.now() - t0, usage: undefined });
        last = { failure, model };
        if (!isRetryable(failure) || call.signal.aborted) break;
      }
    }
    throw finalError(last);
  }
}

export function asFailure(error: unknown): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  return new UpstreamFailure('connection', error instanceof Error ? error.message : 'unknown upstream error');
}

function finalError(last: { failure: UpstreamFailure; model: string } | undefined): GatewayError {
  return last ? upstreamToGatewayError(last.failure, last.model) : new GatewayError('upstream_error', 'No model to call.');
}
