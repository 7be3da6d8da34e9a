import { describe, expect, it, vi } from 'vitest';
import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';
import { loadConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { abortFailure, DriverEvents, LlmClient, type UpstreamCall, type UpstreamEvents, type UpstreamJsonResult, UpstreamFailure } from '../upstream/llm-client.js';
import type { RetryEnv } from '../upstream/retry-policy.js';
import type { CompletionCall } from './completion.types.js';
import { type Attempt, UpstreamCaller } from './upstream-caller.js';

/**
 * 'silent': a stream answers 200 and then sends nothing (keep-alive comments only, as far as the
 * caller can tell); `reportAs`: answers naming another model (a dated version, say).
 */
type Reply = 'ok' | 'hang' | 'silent' | UpstreamFailure | { streamCutAfter: number } | { reportAs: string };

/** An LlmClient that answers from a script: per model, a queue of replies (the last one repeats). */
class ScriptedLlm extends LlmClient {
  readonly calls: UpstreamCall[] = [];
  constructor(private readonly script: Record<string, Reply[]>) {
    super();
  }

  private next(call: UpstreamCall): { model: string; reply: Reply } {
    this.calls.push(call);
    const chain = Array.isArray(call.body.models) ? (call.body.models as string[]) : [call.body.model as string];
    // Native fallback: like OpenRouter, the first model of the chain that is not failing answers.
    let reply: Reply = new UpstreamFailure('http', 'no script', 500);
    let model = chain[0];
    for (const m of chain) {
      const queue = this.script[m] ?? ['ok'];
      reply = (queue.length > 1 ? queue.shift() : queue[0]) as Reply;
      model = m;
      if (!(reply instanceof UpstreamFailure)) break;
    }
    return { model, reply };
  }

  async complete(call: UpstreamCall): Promise<UpstreamJsonResult> {
    const { model, reply } = this.next(call);
    if (reply instanceof UpstreamFailure) throw reply;
    if (reply === 'hang' || reply === 'silent') return hang(call.signal);
    const completion = {
      id: 'c1',
      object: 'chat.completion',
      created: 1,
      model: typeof reply === 'object' && 'reportAs' in reply ? reply.reportAs : model,
      choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
    } as unknown as ChatCompletion;
    return { completion, raw: JSON.stringify(completion) };
  }

  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    const { model, reply } = this.next(call);
    if (reply instanceof UpstreamFailure) throw reply;
    if (reply === 'hang') return hang(call.signal);
    const signal = call.signal;
    // Handed out as the drivers do, each event with its parse (UpstreamEvents.parsed).
    if (reply === 'silent') {
      return new DriverEvents((out) =>
        (async function* () {
          await hang(signal);
          yield out.yielding('{}', {});
        })(),
      );
    }
    const cutAfter = typeof reply === 'object' && 'streamCutAfter' in reply ? reply.streamCutAfter : Infinity;
    const named = typeof reply === 'object' && 'reportAs' in reply ? reply.reportAs : model;
    return new DriverEvents((out) =>
      (async function* () {
        for (let i = 0; i < 3; i++) {
          // A real relay awaits the socket between events.
          await Promise.resolve();
          if (i >= cutAfter) throw new UpstreamFailure('cut', 'cut');
          const chunk = { model: named, choices: [{ index: 0, delta: { content: `w${i}` } }] };
          yield out.yielding(JSON.stringify(chunk), chunk);
        }
      })(),
    );
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A driver that streams the given chunks, each handed out with the very object it was serialised from. */
class ParsingLlm extends LlmClient {
  constructor(private readonly chunks: object[]) {
    super();
  }

  complete(): Promise<UpstreamJsonResult> {
    return Promise.reject(new Error('streams only'));
  }

  stream(): Promise<UpstreamEvents> {
    const chunks = this.chunks;
    return Promise.resolve(
      new DriverEvents((out) =>
        (async function* () {
          for (const c of chunks) {
            await Promise.resolve();
            yield out.yielding(JSON.stringify(c), c);
          }
        })(),
      ),
    );
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

function hang(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => signal.addEventListener('abort', () => reject(abortFailure(signal)), { once: true }));
}

/** Random fixed at 0.5 and sleeping that only records: no test waits for real backoff. */
function fakeEnv(): RetryEnv & { slept: number[] } {
  const slept: number[] = [];
  return { slept, random: () => 0.5, sleep: (ms, signal) => (slept.push(ms), Promise.resolve(!signal.aborted)) };
}

function caller(llm: LlmClient, env: RetryEnv, extra: Record<string, string> = {}) {
  const config = loadConfig({
    OPENROUTER_BASE_URL: 'http://127.0.0.1:1/v1',
    UPSTREAM_RETRY_BASE_MS: '100',
    UPSTREAM_RETRY_MAX_DELAY_MS: '1000',
    UPSTREAM_RETRY_AFTER_MAX_MS: '2000',
    ...extra,
  });
  return new UpstreamCaller(llm, config, env);
}

function call(signal = new AbortController().signal, model?: string): CompletionCall {
  return {
    principal: { keyId: 'k', keyPrefix: 'gh_x', userId: 'u', departmentId: 'd', role: 'user', cacheScope: 'user', expiresAt: undefined },
    requestId: 'req-1',
    body: { messages: [{ role: 'user', content: 'x' }], ...(model ? { model } : {}) },
    taskType: undefined,
    door: 'chat',
    signal,
    cacheControl: { read: true, write: true, ttlSeconds: undefined },
  };
}

function route(models: string[], explicitModel = false): ResolvedRoute {
  return { requestedTaskType: 'code', ruleTaskType: 'code', version: 1, models, maxTokens: 64, explicitModel };
}

const PRIMARY = 'anthropic/claude-3.5-sonnet';
const FALLBACK = 'openai/gpt-4o-mini';
const http = (status: number, retryAfterMs?: number) => new UpstreamFailure('http', `HTTP ${status}`, status, retryAfterMs);

async function failure(p: Promise<unknown>): Promise<GatewayError> {
  const e = await p.then(
    () => undefined,
    (error: unknown) => error,
  );
  expect(e).toBeInstanceOf(GatewayError);
  return e as GatewayError;
}

const summary = (attempts: Attempt[]) => attempts.map((a) => `${a.model}#${a.try}:${a.ok ? 'ok' : (a.status ?? a.failure)}${a.counted ? ':counted' : ''}`);

describe('UpstreamCaller: retries, backoff and fallbacks', () => {
  it('retries the primary with backoff, then falls back; every attempt is recorded', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)] });
    const env = fakeEnv();
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, env).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(FALLBACK);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:503`, `${PRIMARY}#2:503`, `${FALLBACK}#1:ok:counted`]);
    expect(env.slept).toEqual([50]); // full jitter: 0.5 × base 100
    expect(attempts[1]?.waitedMs).toBe(50);
    expect(llm.calls.map((c) => c.body.model)).toEqual([PRIMARY, PRIMARY, FALLBACK]);
  });

  it('recovers on the same model when a retry succeeds', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [new UpstreamFailure('connection', 'reset'), 'ok'] });
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(PRIMARY);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:connection`, `${PRIMARY}#2:ok:counted`]);
  });

  it('honours retry-after, and skips to the next model when it asks for more than the cap', async () => {
    const env = fakeEnv();
    const waited = new ScriptedLlm({ [PRIMARY]: [http(429, 1000), 'ok'] });
    await caller(waited, env).json(call(), route([PRIMARY, FALLBACK]), []);
    expect(env.slept).toEqual([1000]);
    expect(waited.calls.map((c) => c.body.model)).toEqual([PRIMARY, PRIMARY]);

    const tooLong = new ScriptedLlm({ [PRIMARY]: [http(429, 60_000), 'ok'] });
    const env2 = fakeEnv();
    const { model } = await caller(tooLong, env2).json(call(), route([PRIMARY, FALLBACK]), []);
    expect(model).toBe(FALLBACK);
    expect(env2.slept).toEqual([]);
  });

  it.each([400, 401, 402, 403, 413, 422])('never retries or falls back on HTTP %i', async (status) => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(status)] });
    const env = fakeEnv();
    const attempts: Attempt[] = [];
    await failure(caller(llm, env).json(call(), route([PRIMARY, FALLBACK]), attempts));
    expect(llm.calls).toHaveLength(1);
    expect(env.slept).toEqual([]);
  });

  it("maps what survives: our key and credit problems are 502s, the caller's request stays a 400", async () => {
    const codes: Record<number, string> = {};
    for (const status of [400, 401, 402, 413, 429]) {
      const e = await failure(caller(new ScriptedLlm({ [PRIMARY]: [http(status)] }), fakeEnv()).json(call(), route([PRIMARY]), []));
      codes[status] = `${e.status} ${e.code}`;
    }
    expect(codes).toEqual({
      400: '400 invalid_value',
      401: '502 upstream_auth',
      402: '502 upstream_insufficient_credits',
      413: '413 payload_too_large',
      429: '502 upstream_rate_limited',
    });
  });

  it("moves past an unknown model without retrying it; the table's unknown model is a 502, the caller's a 400", async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(404)] });
    const attempts: Attempt[] = [];
    expect((await caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts)).model).toBe(FALLBACK);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:404`, `${FALLBACK}#1:ok:counted`]);

    const tableChose = await failure(caller(new ScriptedLlm({ [PRIMARY]: [http(404)] }), fakeEnv()).json(call(), route([PRIMARY]), []));
    expect(tableChose).toMatchObject({ status: 502, code: 'upstream_error' });
    const callerNamed = await failure(
      caller(new ScriptedLlm({ 'x/unknown': [http(404)] }), fakeEnv()).json(call(undefined, 'x/unknown'), route(['x/unknown'], true), []),
    );
    expect(callerNamed).toMatchObject({ status: 400, code: 'model_not_found', param: 'model' });
    // The caller's model unknown, the fallbacks the rule's: stopped there, the caller's 400.
    const typo = new ScriptedLlm({ 'x/unknown': [http(404)] });
    const typoAttempts: Attempt[] = [];
    const stopped = await failure(caller(typo, fakeEnv()).json(call(undefined, 'x/unknown'), route(['x/unknown', FALLBACK], true), typoAttempts));
    expect(stopped).toMatchObject({ status: 400, code: 'model_not_found' });
    expect(summary(typoAttempts)).toEqual(['x/unknown#1:404']);
    // OpenRouter's 404 for a model without a provider for this request falls back as before.
    const noEndpoints = new UpstreamFailure('http', 'No endpoints found that support tool use.', 404);
    const capable = await caller(new ScriptedLlm({ [PRIMARY]: [noEndpoints] }), fakeEnv()).json(call(undefined, PRIMARY), route([PRIMARY, FALLBACK], true), []);
    expect(capable.model).toBe(FALLBACK);
  });

  it("moves past a table model OpenRouter does not know (its 400, not a 404); the caller's own is its 400", async () => {
    const notValid = new UpstreamFailure('http', `${PRIMARY} is not a valid model ID`, 400, undefined, '400');
    const llm = new ScriptedLlm({ [PRIMARY]: [notValid] });
    const attempts: Attempt[] = [];
    expect((await caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts)).model).toBe(FALLBACK);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:400`, `${FALLBACK}#1:ok:counted`]);
    const tableChose = await failure(caller(new ScriptedLlm({ [PRIMARY]: [notValid] }), fakeEnv()).json(call(), route([PRIMARY]), []));
    expect(tableChose).toMatchObject({ status: 502, code: 'upstream_error' });
    const typo = new ScriptedLlm({ [PRIMARY]: [notValid] });
    const callerNamed = await failure(caller(typo, fakeEnv()).json(call(undefined, PRIMARY), route([PRIMARY, FALLBACK], true), []));
    expect(callerNamed).toMatchObject({ status: 400, code: 'model_not_found', param: 'model' });
    expect(typo.calls).toHaveLength(1);
  });

  it('answers with the last cause when every model fails', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [http(500)] });
    const attempts: Attempt[] = [];
    const e = await failure(caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts));
    expect(e).toMatchObject({ status: 502, code: 'upstream_error' });
    expect(e.message).toBe(`The upstream (${FALLBACK}) failed with HTTP 500 (4 attempts).`);
    expect(attempts).toHaveLength(4);
    expect(attempts.every((a) => a.counted === false)).toBe(true);
  });

  it('bounds everything by the total deadline', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: ['hang'], [FALLBACK]: ['hang'] });
    const attempts: Attempt[] = [];
    const started = performance.now();
    const e = await failure(caller(llm, fakeEnv(), { UPSTREAM_DEADLINE_MS: '100' }).json(call(), route([PRIMARY, FALLBACK]), attempts));
    expect(e).toMatchObject({ status: 504, code: 'upstream_timeout' });
    expect(performance.now() - started).toBeLessThan(1000);
    // UPSTREAM_TIMEOUT_MS is beyond the deadline: the primary had all of it, the fallback no turn.
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:timeout`]);
  });

  it('hands a primary that does not answer in time over to the fallback, not to a retry of itself (JSON and stream)', async () => {
    // UPSTREAM_TIMEOUT_MS ends the primary's only try, well inside the deadline.
    const config = { UPSTREAM_TIMEOUT_MS: '150', UPSTREAM_DEADLINE_MS: '60000' };
    const json = new ScriptedLlm({ [PRIMARY]: ['hang'] });
    const attempts: Attempt[] = [];
    const started = performance.now();
    expect((await caller(json, fakeEnv(), config).json(call(), route([PRIMARY, FALLBACK]), attempts)).model).toBe(FALLBACK);
    expect(performance.now() - started).toBeLessThan(400);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:timeout`, `${FALLBACK}#1:ok:counted`]);
    // The fallback runs under a signal of its own: the one the primary's bound aborted would end it at once.
    expect(json.calls[1]?.signal.aborted).toBe(false);

    // Keep-alive comments only, as far as the caller can tell: no first event in time.
    const stream = new ScriptedLlm({ [PRIMARY]: ['silent'] });
    const streamed: Attempt[] = [];
    expect((await caller(stream, fakeEnv(), config).stream(call(), route([PRIMARY, FALLBACK]), streamed)).model).toBe(FALLBACK);
    expect(summary(streamed)).toEqual([`${PRIMARY}#1:timeout`]);
  });

  it('bounds an attempt by UPSTREAM_TIMEOUT_MS or what is left of the deadline, whichever ends first', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503), 'hang'], [FALLBACK]: ['hang'] });
    const attempts: Attempt[] = [];
    const config = { UPSTREAM_TIMEOUT_MS: '100', UPSTREAM_DEADLINE_MS: '150' };
    const e = await failure(caller(llm, fakeEnv(), config).json(call(), route([PRIMARY, FALLBACK]), attempts));
    expect(e).toMatchObject({ status: 504, code: 'upstream_timeout' });
    // The retry had its full 100 ms; the fallback the ~50 ms left.
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:503`, `${PRIMARY}#2:timeout`, `${FALLBACK}#1:timeout`]);
  });

  it('bounds each attempt by UPSTREAM_TIMEOUT_MS from its start (its driver timers are idle time, not total); the last model is retried', async () => {
    // The drivers' timeouts cannot end these: a body trickled, or a stream of keep-alive comments, is never idle.
    const config = { UPSTREAM_TIMEOUT_MS: '100', UPSTREAM_DEADLINE_MS: '60000' };
    const json = new ScriptedLlm({ [PRIMARY]: ['hang'] });
    const attempts: Attempt[] = [];
    const started = performance.now();
    expect(await failure(caller(json, fakeEnv(), config).json(call(), route([PRIMARY]), attempts))).toMatchObject({
      status: 504,
      code: 'upstream_timeout',
    });
    expect(performance.now() - started).toBeLessThan(1000);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:timeout`, `${PRIMARY}#2:timeout`]);

    const stream = new ScriptedLlm({ [PRIMARY]: ['silent'] });
    expect(await failure(caller(stream, fakeEnv(), config).stream(call(), route([PRIMARY]), []))).toMatchObject({ status: 504, code: 'upstream_timeout' });
    // The client leaving still reaches the attempt, and is not taken for a timeout.
    const leaving = new AbortController();
    const slow = new ScriptedLlm({ [PRIMARY]: ['hang'] });
    const left: Attempt[] = [];
    const pending = failure(caller(slow, fakeEnv(), { UPSTREAM_DEADLINE_MS: '60000' }).json(call(leaving.signal), route([PRIMARY, FALLBACK]), left));
    leaving.abort();
    expect((await pending).code).toBe('client_closed');
    expect(summary(left)).toEqual([`${PRIMARY}#1:client_closed`]);
  });

  it('stops at once when the client goes away during a backoff', async () => {
    const controller = new AbortController();
    const env: RetryEnv = {
      random: () => 0.5,
      sleep: () => {
        controller.abort();
        return Promise.resolve(false);
      },
    };
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)] });
    await failure(caller(llm, env).json(call(controller.signal), route([PRIMARY, FALLBACK]), []));
    expect(llm.calls).toHaveLength(1);
  });

  it('bounds tries per model by UPSTREAM_RETRY_ATTEMPTS', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [http(503)] });
    const env = fakeEnv();
    await failure(caller(llm, env, { UPSTREAM_RETRY_ATTEMPTS: '3' }).json(call(), route([PRIMARY, FALLBACK]), []));
    expect(llm.calls.map((c) => c.body.model)).toEqual([PRIMARY, PRIMARY, PRIMARY, FALLBACK, FALLBACK, FALLBACK]);
    expect(env.slept).toEqual([50, 100, 50, 100]);
  });
});

describe('UpstreamCaller: OpenRouter native fallback', () => {
  const native = { UPSTREAM_NATIVE_FALLBACK: 'true' };

  it('sends the chain once as models + route: "fallback" and reports the model that answered', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)] });
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, fakeEnv(), native).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(FALLBACK);
    expect(llm.calls).toHaveLength(1);
    expect(llm.calls[0]?.body).toMatchObject({ model: PRIMARY, models: [PRIMARY, FALLBACK], route: 'fallback' });
    expect(attempts).toEqual([expect.objectContaining({ model: FALLBACK, ok: true, counted: true, chain: [PRIMARY, FALLBACK] })]);
  });

  it('walks the chain itself when the native request fails as a whole', async () => {
    // Each model fails once: inside the native request, then answers when asked on its own.
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503), 'ok'], [FALLBACK]: [http(503), 'ok'] });
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, fakeEnv(), { ...native, UPSTREAM_RETRY_ATTEMPTS: '1' }).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(PRIMARY);
    expect(llm.calls.map((c) => ('models' in c.body ? 'native' : c.body.model))).toEqual(['native', PRIMARY]);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:503`, `${PRIMARY}#1:ok:counted`]);
    expect(attempts[0]?.chain).toEqual([PRIMARY, FALLBACK]);
  });

  it('after a native request that timed out, asks the fallback alone first and the primary last', async () => {
    const config = { ...native, UPSTREAM_TIMEOUT_MS: '100', UPSTREAM_DEADLINE_MS: '60000' };
    const sent = (llm: ScriptedLlm) => llm.calls.map((c) => ('models' in c.body ? 'native' : c.body.model));
    // The primary hangs: the fallback answers, and the primary is not waited on a second time.
    const hung = new ScriptedLlm({ [PRIMARY]: ['hang'] });
    const attempts: Attempt[] = [];
    expect((await caller(hung, fakeEnv(), config).json(call(), route([PRIMARY, FALLBACK]), attempts)).model).toBe(FALLBACK);
    expect(sent(hung)).toEqual(['native', FALLBACK]);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:timeout`, `${FALLBACK}#1:ok:counted`]);
    // The primary failed fast inside the chain and the fallback hung: the primary still gets its turn.
    const slowFallback = new ScriptedLlm({ [PRIMARY]: [http(503), 'ok'], [FALLBACK]: ['hang'] });
    expect((await caller(slowFallback, fakeEnv(), config).json(call(), route([PRIMARY, FALLBACK]), [])).model).toBe(PRIMARY);
    expect(sent(slowFallback)).toEqual(['native', FALLBACK, PRIMARY]);
  });

  it('sends a single model plainly', async () => {
    const llm = new ScriptedLlm({});
    await caller(llm, fakeEnv(), native).json(call(), route([FALLBACK]), []);
    expect(llm.calls[0]?.body).not.toHaveProperty('models');
    expect(llm.calls[0]?.body).not.toHaveProperty('route');
  });

  // OpenRouter answers an id it does not know with a 400, and refuses a `models` list holding one as a whole.
  const notValid = (model: string) => new UpstreamFailure('http', `${model} is not a valid model ID`, 400, undefined, '400');

  it('walks the chain itself when OpenRouter refuses it over a table model it does not know (its 400)', async () => {
    // The second reply of the chain's last member is the refusal of the whole request; then asked alone, FALLBACK answers.
    const llm = new ScriptedLlm({ [PRIMARY]: [notValid(PRIMARY)], [FALLBACK]: [notValid(PRIMARY), 'ok'] });
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, fakeEnv(), native).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(FALLBACK);
    expect(llm.calls.map((c) => ('models' in c.body ? 'native' : c.body.model))).toEqual(['native', PRIMARY, FALLBACK]);
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:400`, `${PRIMARY}#1:400`, `${FALLBACK}#1:ok:counted`]);
  });

  it("asks for the caller's own model alone, so a typo is its 400 and never answered by the rule's fallback", async () => {
    for (const unknown of [http(404), notValid('x/unknown')]) {
      const llm = new ScriptedLlm({ 'x/unknown': [unknown] });
      const attempts: Attempt[] = [];
      const e = await failure(caller(llm, fakeEnv(), native).json(call(undefined, 'x/unknown'), route(['x/unknown', FALLBACK], true), attempts));
      expect(e).toMatchObject({ status: 400, code: 'model_not_found', param: 'model' });
      expect(llm.calls.map((c) => c.body)).toEqual([expect.not.objectContaining({ models: expect.anything() })]);
      expect(summary(attempts)).toEqual([`x/unknown#1:${unknown.status}`]);
    }
    // Failing otherwise, it still falls back to the rule's fallback, asked alone too.
    const down = new ScriptedLlm({ [PRIMARY]: [http(503)] });
    const { model } = await caller(down, fakeEnv(), { ...native, UPSTREAM_RETRY_ATTEMPTS: '1' }).json(
      call(undefined, PRIMARY),
      route([PRIMARY, FALLBACK], true),
      [],
    );
    expect(model).toBe(FALLBACK);
    expect(down.calls.map((c) => ('models' in c.body ? 'native' : c.body.model))).toEqual([PRIMARY, FALLBACK]);
  });

  it('still sends fallbacks the caller named itself (`models`) as one chain', async () => {
    const llm = new ScriptedLlm({ 'x/unknown': [http(404)] });
    const named: ResolvedRoute = { ...route(['x/unknown', FALLBACK], true), callerFallbacks: true };
    const { model } = await caller(llm, fakeEnv(), native).json(call(undefined, 'x/unknown'), named, []);
    expect(model).toBe(FALLBACK);
    expect(llm.calls).toHaveLength(1);
    expect(llm.calls[0]?.body).toMatchObject({ models: ['x/unknown', FALLBACK], route: 'fallback' });
  });

  it("takes a native stream's model from its first event", async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)] });
    const opened = await caller(llm, fakeEnv(), native).stream(call(), route([PRIMARY, FALLBACK]), []);
    expect(opened.model).toBe(FALLBACK);
  });
});

describe('UpstreamCaller: the model a call is priced as, and the one it shows', () => {
  const DATED = 'openai/gpt-4o-mini-2024-07-18';
  const native = { UPSTREAM_NATIVE_FALLBACK: 'true' };

  it('prices (and records) a call as the model it asked for; the name the upstream answers with is only shown', async () => {
    const attempts: Attempt[] = [];
    const { model } = await caller(new ScriptedLlm({ [FALLBACK]: [{ reportAs: DATED }] }), fakeEnv()).json(call(), route([FALLBACK]), attempts);
    expect(model).toBe(DATED);
    expect(attempts).toEqual([expect.objectContaining({ model: FALLBACK, ok: true })]);
  });

  it('with native fallback, prices the member of the chain that answered, under whatever name it answered', async () => {
    const attempts: Attempt[] = [];
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [{ reportAs: DATED }] });
    const { model } = await caller(llm, fakeEnv(), native).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe(DATED);
    expect(attempts).toEqual([expect.objectContaining({ model: FALLBACK, ok: true, chain: [PRIMARY, FALLBACK] })]);

    const stream = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [{ reportAs: DATED }] });
    const opened = await caller(stream, fakeEnv(), native).stream(call(), route([PRIMARY, FALLBACK]), []);
    expect(opened.model).toBe(DATED);
    expect(opened.pricedModel).toBe(FALLBACK);
  });

  // The drivers parse every event to check it; the first event's model is read from that parse,
  // not from a second one (a streamed miss parsed its first event three times).
  it("shows a stream's model from the parse its driver made of the first event, without parsing it again", async () => {
    const chunks = [
      { model: DATED, choices: [{ index: 0, delta: { content: 'a' }, finish_reason: null }] },
      { model: DATED, choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] },
    ];
    const parse = vi.spyOn(JSON, 'parse');
    try {
      const opened = await caller(new ParsingLlm(chunks), fakeEnv()).stream(call(), route([FALLBACK]), []);
      expect(opened).toMatchObject({ model: DATED, pricedModel: FALLBACK });
      const first = opened.first.value as string;
      expect(parse.mock.calls.filter(([text]) => text === first)).toEqual([]);
      // Handed on with the stream, for the pipeline to read the same parse.
      expect(opened.events.parsed(first)).toBe(chunks[0]);
    } finally {
      parse.mockRestore();
    }
  });

  it('never shows a name a response header cannot carry: the model asked for instead', async () => {
    for (const odd of ['openai/gpt-4o-mini-ü', 'openai/模型', 'a\r\nx-injected: 1', ' padded', '']) {
      const { model } = await caller(new ScriptedLlm({ [FALLBACK]: [{ reportAs: odd }] }), fakeEnv()).json(call(), route([FALLBACK]), []);
      expect(model).toBe(FALLBACK);
    }
    const opened = await caller(new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [{ reportAs: `${FALLBACK}-模型` }] }), fakeEnv(), native).stream(
      call(),
      route([PRIMARY, FALLBACK]),
      [],
    );
    expect(opened).toMatchObject({ model: FALLBACK, pricedModel: FALLBACK });
  });

  it("prices a native chain's answer that names no member of it as the chain's first model", async () => {
    const attempts: Attempt[] = [];
    const llm = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [{ reportAs: 'someone/else' }] });
    const { model } = await caller(llm, fakeEnv(), native).json(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(model).toBe('someone/else');
    expect(attempts[0]?.model).toBe(PRIMARY);
    // A bare, dated name still finds its member.
    const bare = new ScriptedLlm({ [PRIMARY]: [http(503)], [FALLBACK]: [{ reportAs: 'gpt-4o-mini-2024-07-18' }] });
    const priced: Attempt[] = [];
    await caller(bare, fakeEnv(), native).json(call(), route([PRIMARY, FALLBACK]), priced);
    expect(priced[0]?.model).toBe(FALLBACK);
  });
});

/** A JSON 200 that failed mid-generation and reports what it used (the upstream bills it). */
function billedFailure(): UpstreamFailure {
  const f = http(502);
  f.usage = { prompt_tokens: 5, completion_tokens: 50, total_tokens: 55 };
  return f;
}

/** A gate that records what it was shown and answers `allow`. */
function gate(allow: boolean) {
  const seen: string[][] = [];
  const ask = (context: string, attempts: readonly Attempt[]) => {
    seen.push([context, ...summary([...attempts])]);
    return Promise.resolve(allow);
  };
  return { seen, ask };
}

describe('UpstreamCaller: the gate before a retry that follows a billed failure', () => {
  it('is asked before the retry and the fallback after a failed attempt that reported usage, with the attempts so far', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [billedFailure(), billedFailure(), http(503)], [FALLBACK]: ['ok'] });
    const g = gate(true);
    const attempts: Attempt[] = [];
    const { model } = await caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts, g.ask, 'ctx');
    expect(model).toBe(FALLBACK);
    expect(g.seen).toEqual([
      ['ctx', `${PRIMARY}#1:502`],
      ['ctx', `${PRIMARY}#1:502`, `${PRIMARY}#2:502`],
    ]);
  });

  it('is never asked when no failed attempt reported usage, nor after the last attempt', async () => {
    const g = gate(true);
    await caller(new ScriptedLlm({}), fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), [], g.ask, 'ctx');
    await caller(new ScriptedLlm({ [PRIMARY]: [http(503)] }), fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), [], g.ask, 'ctx');
    await failure(
      caller(new ScriptedLlm({ [PRIMARY]: [billedFailure()] }), fakeEnv(), { UPSTREAM_RETRY_ATTEMPTS: '1' }).json(call(), route([PRIMARY]), [], g.ask, 'ctx'),
    );
    expect(g.seen).toEqual([]);
  });

  it('ends the call with the failure it has when the gate refuses: no retry, no fallback', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [billedFailure(), 'ok'] });
    const attempts: Attempt[] = [];
    const e = await failure(caller(llm, fakeEnv()).json(call(), route([PRIMARY, FALLBACK]), attempts, gate(false).ask, 'ctx'));
    expect(e).toMatchObject({ status: 502, code: 'upstream_error' });
    expect(llm.calls).toHaveLength(1);
    expect(attempts[0]?.usage).toMatchObject({ completion_tokens: 50 });
  });

  it("guards a stream's retries before its first event the same way", async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [billedFailure(), 'ok'] });
    const g = gate(true);
    await caller(llm, fakeEnv()).stream(call(), route([PRIMARY]), [], g.ask, 'ctx');
    expect(g.seen).toEqual([['ctx', `${PRIMARY}#1:502`]]);
    const refused = new ScriptedLlm({ [PRIMARY]: [billedFailure(), 'ok'] });
    await failure(caller(refused, fakeEnv()).stream(call(), route([PRIMARY]), [], gate(false).ask, 'ctx'));
    expect(refused.calls).toHaveLength(1);
  });
});

describe('UpstreamCaller: streams retry only before the first event', () => {
  it('retries a stream that breaks before its first event, and hands over the first event read', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [{ streamCutAfter: 0 }, 'ok'] });
    const attempts: Attempt[] = [];
    const opened = await caller(llm, fakeEnv()).stream(call(), route([PRIMARY, FALLBACK]), attempts);
    expect(opened.model).toBe(PRIMARY);
    expect(opened.first.done).toBe(false);
    expect(JSON.parse(opened.first.value as string)).toMatchObject({ choices: [{ delta: { content: 'w0' } }] });
    expect(summary(attempts)).toEqual([`${PRIMARY}#1:cut`]);
    expect(llm.calls).toHaveLength(2);
  });

  it('leaves a failure after the first event to the pipeline (no second call)', async () => {
    const llm = new ScriptedLlm({ [PRIMARY]: [{ streamCutAfter: 2 }, 'ok'] });
    const opened = await caller(llm, fakeEnv()).stream(call(), route([PRIMARY, FALLBACK]), []);
    await opened.iterator.next();
    await expect(opened.iterator.next()).rejects.toMatchObject({ kind: 'cut' });
    expect(llm.calls).toHaveLength(1);
  });

  it('does not let the deadline cut a stream that already started', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    try {
      const llm = new ScriptedLlm({});
      const opened = await caller(llm, fakeEnv(), { UPSTREAM_DEADLINE_MS: '100' }).stream(call(), route([PRIMARY]), []);
      vi.advanceTimersByTime(10_000);
      expect(llm.calls[0]?.signal.aborted).toBe(false);
      const rest: string[] = [];
      for (let next = await opened.iterator.next(); !next.done; next = await opened.iterator.next()) rest.push(next.value);
      expect(rest).toHaveLength(2);
    } finally {
      vi.useRealTimers();
    }
  });
});
