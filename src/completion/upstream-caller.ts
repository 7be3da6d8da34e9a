import { Inject, Injectable, Optional } from '@nestjs/common';
import { readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { LlmClient, type UpstreamEvents, UpstreamFailure, type UpstreamJsonResult } from '../upstream/llm-client.js';
import { RetryPolicy, type RetryEnv, SYSTEM_RETRY_ENV } from '../upstream/retry-policy.js';
import { failureAction, isUnknownModel, upstreamToGatewayError } from '../upstream/upstream-errors.js';
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
  /**
   * true when the caller received this attempt's output (the answer, or a stream that broke after
   * its first byte); the failed tries before it are recorded with false.
   */
  counted?: boolean;
  /** 1 for the first try of a model (or of a native-fallback request), 2 for its first retry, … */
  try?: number;
  /** Milliseconds waited (backoff or retry-after) before this attempt. */
  waitedMs?: number;
  /** Set on an OpenRouter native-fallback request: the whole chain it carried. */
  chain?: string[];
}

export interface OpenedStream {
  /** The model shown to the caller (x-gateway-model): as the upstream named it, when a header can carry that. */
  model: string;
  /** The model the gateway asked for that answered: what the stream is priced and recorded as. */
  pricedModel: string;
  iterator: AsyncIterator<string>;
  /** The first event, already read: proof the upstream is really answering. */
  first: IteratorResult<string>;
  /** What `iterator` reads: its `parsed` hands over the driver's parse of each event, so it is not parsed again. */
  events: UpstreamEvents;
  startedAt: number;
}

/**
 * Asked before a retry or fallback that follows a failed attempt which reported usage (an upstream
 * bills a failure mid-generation): false ends the call with the failure it has. The pipeline's
 * budget holds the next attempt's worst case here. `context` is the caller's, passed back as it
 * came: a stable function and its context cost a call nothing, where a closure per call would.
 */
export type RetryGate<C> = (context: C, attempts: readonly Attempt[]) => Promise<boolean>;

/** Tests swap randomness and waiting (see retry-policy.spec / upstream-caller.spec). */
export const RETRY_ENV = Symbol('RETRY_ENV');

/** One unit of the walk: a single model, or (native) the whole chain in one OpenRouter request. */
interface Plan {
  model: string;
  chain: string[] | undefined;
}

interface Success<T> {
  value: T;
  plan: Plan;
  tryNumber: number;
  waitedMs: number;
  startedAt: number;
}

/**
 * The time bounds of one call: its total deadline, and each attempt's own bound from its start to
 * the whole JSON answer or a stream's first event, UPSTREAM_TIMEOUT_MS or what is left of the
 * deadline if less. The drivers' own timeouts only measure idle time, which keep-alives reset
 * (whitespace before a JSON body, `: OPENROUTER PROCESSING` comments): without this bound a hung
 * or slow primary held the call until the deadline and its healthy fallback was never asked. Not
 * the deadline shared out among the models still to try: that cut an answer a model really needs
 * longer for (a 50 s generation, 120 s ÷ 3 plans with native fallback) and made raising
 * UPSTREAM_TIMEOUT_MS useless. After a stream's first event only the idle timeout applies.
 *
 * Cost, on every request's path: one AbortController and one listener on the caller's signal per
 * call, and one timer per attempt: what the deadline alone cost before (0.34 µs per one-attempt
 * call either way, measured; AbortSignal.any over an AbortSignal.timeout per attempt ~4 µs, and
 * AbortSignal.any alone was once measured at ~11 µs). The bound and the deadline share the timer:
 * the bound never ends after the deadline, and between attempts nothing is in flight (a backoff is
 * only started when it ends before the deadline). The listener aborts whichever controller is
 * current, so an attempt adds no listener; a controller is replaced only after a bound aborted it.
 */
class Deadline {
  private controller = new AbortController();
  private timer: NodeJS.Timeout | undefined;
  private readonly endsAt: number;
  private passed = false;
  /** The armed bound is the deadline itself: when it fires, the call is over. */
  private boundIsDeadline = false;
  private boundMs = 0;
  // One function per call, not one per attempt; it builds its reason only when it fires.
  private readonly fire = (): void => {
    this.timer = undefined;
    let reason: UpstreamFailure;
    if (this.boundIsDeadline) {
      this.passed = true;
      reason = new UpstreamFailure('timeout', `no answer within the ${this.ms} ms upstream deadline`);
    } else {
      reason = new UpstreamFailure('timeout', `no answer within the ${Math.round(this.boundMs)} ms given to this attempt`);
    }
    this.controller.abort(reason);
  };

  constructor(
    private readonly callSignal: AbortSignal,
    private readonly ms: number,
    private readonly attemptMs: number,
  ) {
    this.endsAt = performance.now() + ms;
    // Kept for the whole call: after a stream's first event, a client leaving must still stop it.
    if (callSignal.aborted) this.controller.abort(callSignal.reason);
    else callSignal.addEventListener('abort', () => this.controller.abort(callSignal.reason), { once: true });
  }

  /** What the next attempt, or a backoff, listens to: the caller leaving, or its bound passing. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** true once the deadline itself (not the client, nor one attempt's bound) ended the call. */
  get expired(): boolean {
    return this.passed;
  }

  allows(waitMs: number): boolean {
    return performance.now() + waitMs < this.endsAt;
  }

  /** Arms the bound of the attempt about to start. */
  arm(): AbortSignal {
    const left = this.endsAt - performance.now();
    const bound = Math.min(this.attemptMs, left);
    this.boundIsDeadline = bound >= left;
    this.boundMs = bound;
    this.timer = setTimeout(this.fire, bound);
    this.timer.unref();
    return this.controller.signal;
  }

  /** The attempt failed: its bound is cleared, and a signal the bound aborted is replaced for what follows. */
  settle(): void {
    clearTimeout(this.timer);
    if (this.controller.signal.aborted && !this.callSignal.aborted) this.controller = new AbortController();
  }

  /** The answer (or a stream's first event) is in, or the walk is over. */
  disarm(): void {
    clearTimeout(this.timer);
  }
}

/**
 * Walks the route's model chain until one answers, retrying each model with backoff on
 * transient failures (upstream-errors.ts decides which), all within one total deadline. With
 * OpenRouter (or UPSTREAM_NATIVE_FALLBACK=true) the whole chain first goes out as one request
 * (`models` + `route: "fallback"`; not when the caller named its model but not the fallbacks, see
 * plans()) and OpenRouter walks it; if that request fails as a whole,
 * the gateway walks the chain itself. For streams everything happens before the first event:
 * after that the caller owns the stream and there is no going back.
 * Every attempt is appended to `attempts`, failed or not (a successful stream's own attempt is
 * appended by the pipeline when the stream ends, with its usage).
 */
@Injectable()
export class UpstreamCaller {
  private readonly policy: RetryPolicy;
  private readonly env: RetryEnv;

  constructor(
    private readonly llm: LlmClient,
    private readonly config: AppConfig,
    @Optional() @Inject(RETRY_ENV) env?: RetryEnv,
  ) {
    this.env = env ?? SYSTEM_RETRY_ENV;
    this.policy = new RetryPolicy(config.upstream.retry, () => this.env.random());
  }

  async json<C>(
    call: CompletionCall,
    route: ResolvedRoute,
    attempts: Attempt[],
    gate?: RetryGate<C>,
    context?: C,
  ): Promise<{ model: string; result: UpstreamJsonResult }> {
    const won = await this.walk(
      call,
      route,
      attempts,
      (plan, signal) => this.llm.complete({ body: this.body(call, route, plan, false), requestId: call.requestId, signal }),
      gate,
      context,
    );
    const result = won.value;
    const reported = typeof result.completion.model === 'string' ? result.completion.model : undefined;
    const pricedModel = answeredModel(won.plan, reported);
    attempts.push({
      model: pricedModel,
      ok: true,
      status: 200,
      failure: undefined,
      latencyMs: performance.now() - won.startedAt,
      usage: readUsage(result.completion),
      counted: true,
      try: won.tryNumber,
      waitedMs: won.waitedMs,
      ...(won.plan.chain ? { chain: won.plan.chain } : {}),
    });
    return { model: headerSafeModel(reported, pricedModel), result };
  }

  async stream<C>(call: CompletionCall, route: ResolvedRoute, attempts: Attempt[], gate?: RetryGate<C>, context?: C): Promise<OpenedStream> {
    const won = await this.walk(
      call,
      route,
      attempts,
      async (plan, signal) => {
        const events = await this.llm.stream({ body: this.body(call, route, plan, true), requestId: call.requestId, signal });
        const iterator = events[Symbol.asyncIterator]();
        // The first event is read inside the walk: a stream that dies before it is still retryable.
        const first = await iterator.next();
        // [DONE] straight away is no answer: relayed, the caller would get a 200 with nothing in it.
        if (first.done === true) throw new UpstreamFailure('bad_response', 'upstream stream ended without an event');
        return { events, iterator, first };
      },
      gate,
      context,
    );
    const { events, iterator, first } = won.value;
    // The first event's model, as json() reads its answer's: every stream shows the upstream's own
    // name (a dated one too), so a live stream and its cache replay carry the same x-gateway-model.
    // Read from the driver's parse. Pricing is untouched: answeredModel() heeds the name only for
    // a native chain.
    const reported = first.done ? undefined : modelOfChunk(events.parsed(first.value));
    const pricedModel = answeredModel(won.plan, reported);
    return { model: headerSafeModel(reported, pricedModel), pricedModel, iterator, first, events, startedAt: won.startedAt };
  }

  private body(call: CompletionCall, route: ResolvedRoute, plan: Plan, stream: boolean): Record<string, unknown> {
    const body = upstreamBody(call, route, plan.model, stream);
    if (plan.chain) {
      body.models = plan.chain;
      body.route = 'fallback';
    }
    return body;
  }

  private plans(route: ResolvedRoute): Plan[] {
    const single = route.models.map((model) => ({ model, chain: undefined }));
    if (!this.config.upstream.nativeFallback || route.models.length < 2) return single;
    // The caller's own model with the rule's fallbacks: asked alone first, so a typo is the
    // caller's 400 (callersModelUnknown), as without native fallback; in a chain OpenRouter would
    // quietly answer it with a fallback, and the caller pay for a model it never asked for.
    if (route.explicitModel && route.callerFallbacks !== true) return single;
    return [{ model: route.models[0], chain: route.models }, ...single];
  }

  private async walk<T, C>(
    call: CompletionCall,
    route: ResolvedRoute,
    attempts: Attempt[],
    once: (plan: Plan, signal: AbortSignal) => Promise<T>,
    gate: RetryGate<C> | undefined,
    context: C | undefined,
  ): Promise<Success<T>> {
    const deadline = new Deadline(call.signal, this.config.upstream.retry.deadlineMs, this.config.upstream.timeoutMs);
    const plans = this.plans(route);
    let last: { failure: UpstreamFailure; plan: Plan } | undefined;
    let tries = 0;
    // The last failed attempt reported usage: the gate decides whether another goes out. Asked
    // here, only once there is a next attempt (not after the chain's last).
    let billed = false;
    try {
      chain: for (let p = 0; p < plans.length; p++) {
        const plan = plans[p];
        let waitedMs = 0;
        for (let tryNumber = 1; ; tryNumber++) {
          if (deadline.signal.aborted || !deadline.allows(0)) break chain;
          if (billed) {
            billed = false;
            if (!(await (gate as RetryGate<C>)(context as C, attempts)) || !deadline.allows(0)) break chain;
          }
          const startedAt = performance.now();
          tries++;
          try {
            const value = await once(plan, deadline.arm());
            return { value, plan, tryNumber, waitedMs, startedAt };
          } catch (error) {
            deadline.settle();
            const failure = asFailure(error);
            attempts.push({
              model: plan.model,
              ok: false,
              status: failure.status,
              // Cut short because the caller left: that is not the upstream's failure (metrics, audit).
              failure: failure.kind === 'aborted' && call.signal.aborted ? 'client_closed' : failure.kind,
              latencyMs: performance.now() - startedAt,
              // Usually none (a failed attempt costs nothing), but a 200 that reports an error may bill what it produced.
              usage: failure.usage,
              counted: false,
              try: tryNumber,
              waitedMs,
              ...(plan.chain ? { chain: plan.chain } : {}),
            });
            last = { failure, plan };
            billed = gate !== undefined && failure.usage !== undefined;
            const action = failureAction(failure, p < plans.length - 1);
            if (action === 'stop' || deadline.signal.aborted || deadline.expired || callersModelUnknown(route, plan, failure)) break chain;
            if (action === 'next_model') {
              // A native chain that timed out was waiting on a slow member, and which one the
              // gateway cannot tell: most likely its first (OpenRouter moves on from a member that
              // fails, and asks the first first), yet possibly a fallback after the first failed
              // fast. So the fallbacks are asked alone first and the first model last, if the
              // deadline leaves time: a hung primary no longer spends the deadline a second time,
              // and one that only failed for a moment still gets its turn.
              if (plan.chain !== undefined && failure.kind === 'timeout' && p + 2 < plans.length) plans.push(...plans.splice(p + 1, 1));
              continue chain;
            }
            const delay = this.policy.delayBeforeRetry(tryNumber, failure);
            // A wait that would overrun the deadline is better spent on the next model.
            if (delay === undefined || !deadline.allows(delay)) continue chain;
            if (delay > 0 && !(await this.env.sleep(delay, deadline.signal))) break chain;
            waitedMs = delay;
          }
        }
      }
    } finally {
      deadline.disarm();
    }
    throw finalError(last, route, tries, deadline.expired, call.signal.aborted);
  }
}

/**
 * The upstream does not know the model the caller named (404/410, OpenRouter's 400 "… is not a
 * valid model ID": isUnknownModel): a typo, or a model that is gone. The caller's mistake,
 * answered as 400 model_not_found (finalError), not quietly by the rule's fallback, which the
 * caller would pay for without having asked for it. Fallbacks the caller named itself (`models`)
 * are its own choice and are still walked.
 */
function callersModelUnknown(route: ResolvedRoute, plan: Plan, failure: UpstreamFailure): boolean {
  if (!route.explicitModel || route.callerFallbacks === true || plan.chain || plan.model !== route.models[0]) return false;
  if (!isUnknownModel(failure)) return false;
  // OpenRouter's 404 for a model that exists but has no provider for what the request needs
  // ("No endpoints found that support tool use", "…matching your data policy") is what the
  // rule's fallbacks are for.
  return !NO_ENDPOINTS.test(failure.message);
}

const NO_ENDPOINTS = /no endpoints? (found|available)/i;

export function asFailure(error: unknown): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  return new UpstreamFailure('connection', error instanceof Error ? error.message : 'unknown upstream error');
}

/**
 * The model a call is priced, reserved and recorded as: the one the gateway asked for. A single
 * model's request is that model whatever name the answer gives (OpenRouter names dated versions,
 * `openai/gpt-4o-mini-2024-07-18`, which no pricing table lists: priced so, the call paid the
 * fallback price). A native chain's answer names which member answered: that member, or the
 * longest one the name extends (a dated version, with or without the provider prefix); a name
 * that matches none is priced as the chain's first model.
 */
export function answeredModel(plan: { model: string; chain?: readonly string[] }, reported: string | undefined): string {
  const chain = plan.chain;
  if (chain === undefined || reported === undefined || reported === '') return plan.model;
  if (chain.includes(reported)) return reported;
  let best: string | undefined;
  for (const member of chain) {
    const bare = member.slice(member.indexOf('/') + 1);
    if ((extendsName(reported, member) || extendsName(reported, bare)) && (best === undefined || member.length > best.length)) best = member;
  }
  return best ?? plan.model;
}

/** `name` is `base` or `base` qualified: `base-2024-07-18`, `base:free`, `base@v2`. */
function extendsName(name: string, base: string): boolean {
  if (!name.startsWith(base)) return false;
  if (name.length === base.length) return true;
  const next = name.charCodeAt(base.length);
  return next === 45 /* - */ || next === 58 /* : */ || next === 64 /* @ */ || next === 46; /* . */
}

/** Longest model name shown in a header; any longer is no model id. */
const MAX_SHOWN_MODEL = 256;

/**
 * The model name to show the caller (x-gateway-model, logs, metrics): as the upstream named it
 * when that is printable ASCII without leading or trailing spaces (anything else could not be sent
 * as a header: Node refuses it and the answer, already charged, became a 500), else `fallback`.
 */
export function headerSafeModel(name: string | undefined, fallback: string): string {
  if (name === undefined || name.length === 0 || name.length > MAX_SHOWN_MODEL) return fallback;
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (c < 0x20 || c > 0x7e) return fallback;
  }
  return name.charCodeAt(0) === 0x20 || name.charCodeAt(name.length - 1) === 0x20 ? fallback : name;
}

function modelOfChunk(chunk: object): string | undefined {
  const model = (chunk as { model?: unknown }).model;
  return typeof model === 'string' && model !== '' ? model : undefined;
}

/** The last cause decides the answer: it is the most recent word from the upstream. */
function finalError(
  last: { failure: UpstreamFailure; plan: Plan } | undefined,
  route: ResolvedRoute,
  tries: number,
  deadlineExpired: boolean,
  cancelled: boolean,
): GatewayError {
  if (!last) {
    if (cancelled) return new GatewayError('client_closed', 'The request was cancelled before the upstream answered.');
    if (deadlineExpired) return new GatewayError('upstream_timeout', 'The upstream did not answer within the deadline.');
    return new GatewayError('upstream_error', 'No model to call.');
  }
  const callerNamedModel = route.explicitModel && last.plan.model === route.models[0] && !last.plan.chain;
  return upstreamToGatewayError(last.failure, last.plan.chain ? last.plan.chain.join(' → ') : last.plan.model, { callerNamedModel, attempts: tries });
}
