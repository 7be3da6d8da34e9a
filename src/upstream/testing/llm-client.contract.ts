import { createServer as createHttpServer } from 'node:http';
import { createServer } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../../../libs/stub-upstream/src/index.js';
import { type LlmClient, type UpstreamCall, type UpstreamEvents, UpstreamFailure } from '../llm-client.js';

/** What every driver is built from (the fields upstream.module.ts hands both). */
export interface LlmClientUnderTestOptions {
  baseUrl: string;
  apiKey: string;
  timeoutMs: number;
  extraHeaders: Record<string, string>;
  /** Upstream connections a driver with its own pool may hold (the undici driver); others ignore it. */
  connections?: number;
}

export type LlmClientFactory = (options: LlmClientUnderTestOptions) => LlmClient;

const API_KEY = 'sk-contract-0123456789abcdef';
const EXTRA_HEADERS = { 'HTTP-Referer': 'https://gatehouse.test', 'X-Title': 'Gatehouse contract' };
const MODEL = 'openai/gpt-4o-mini';
const PROMPT = 'hello contract';
const REPLY = `Mock reply to: ${PROMPT}`;
/** Generous for a loopback stub, small enough that a hung upstream ends the test quickly. */
const TIMEOUT_MS = 400;
/**
 * How late a timeout may fire: undici runs its headers/body timeouts on a coarse shared timer
 * (500 ms ticks), so it fires up to ~1 s after the configured time (measured ~950 ms for 400).
 */
const TIMEOUT_SLACK_MS = 1500;

interface ChunkShape {
  choices?: Array<{ delta?: { role?: string; content?: string }; finish_reason?: string | null }>;
  usage?: { completion_tokens?: number };
}

/** The bodies upstream-body.ts builds: no `stream` for JSON, `stream` + usage for SSE. */
function jsonBody(): Record<string, unknown> {
  return { model: MODEL, messages: [{ role: 'user', content: PROMPT }], max_tokens: 64, temperature: 0.2 };
}
function streamBody(): Record<string, unknown> {
  return { ...jsonBody(), stream: true, stream_options: { include_usage: true } };
}

function call(body: Record<string, unknown>, signal: AbortSignal = new AbortController().signal): UpstreamCall {
  return { body, requestId: 'req-contract-1', signal };
}

/** The rejection of `work`, checked to be an UpstreamFailure that does not leak the upstream key. */
async function failureOf(work: Promise<unknown>): Promise<UpstreamFailure> {
  let caught: unknown;
  try {
    await work;
  } catch (error) {
    caught = error;
  }
  expect(caught, 'expected the call to fail').toBeInstanceOf(UpstreamFailure);
  const failure = caught as UpstreamFailure;
  expect(failure.message).not.toContain(API_KEY);
  return failure;
}

/** Reads a stream to its end, keeping what arrived before a failure in `into`. */
async function drain(events: UpstreamEvents, into: string[] = []): Promise<string[]> {
  for await (const data of events) into.push(data);
  return into;
}

function parse(data: string): ChunkShape {
  return JSON.parse(data) as ChunkShape;
}

/** A loopback port nobody listens on: bound, then released. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

/**
 * The behaviour the completion pipeline (upstream-caller.ts, the stream relay, the error
 * mapping) relies on from every LlmClient driver, checked over real HTTP against the project's
 * stub upstream on loopback. Run by test/integration/llm-client.int-spec.ts for each driver.
 */
export function llmClientContract(name: string, make: LlmClientFactory): void {
  describe(`LlmClient contract: ${name}`, () => {
    let stub: StubUpstream;
    const opened: LlmClient[] = [];
    const client = (over: Partial<LlmClientUnderTestOptions> = {}): LlmClient => {
      const c = make({ baseUrl: stub.url, apiKey: API_KEY, timeoutMs: TIMEOUT_MS, extraHeaders: EXTRA_HEADERS, ...over });
      opened.push(c);
      return c;
    };

    beforeAll(async () => {
      stub = await startStubUpstream();
    });
    afterEach(async () => {
      await Promise.all(opened.splice(0).map((c) => c.close()));
      stub.reset();
    });
    afterAll(async () => {
      await stub.close();
    });

    describe('JSON', () => {
      it('returns the completion and the body as the upstream sent it', async () => {
        const { completion, raw } = await client().complete(call(jsonBody()));
        expect(completion.object).toBe('chat.completion');
        expect(completion.model).toBe(MODEL);
        expect(completion.choices[0].message.content).toBe(REPLY);
        expect(completion.usage).toMatchObject({ completion_tokens: 5 });
        expect(JSON.parse(raw)).toEqual(completion);
      });

      it('sends the body as given, the upstream key and the extra headers', async () => {
        const body = jsonBody();
        await client().complete(call(body));
        expect(stub.requests).toHaveLength(1);
        const seen = stub.requests[0];
        expect(seen.method).toBe('POST');
        expect(seen.path).toBe('/v1/chat/completions');
        // Exactly the pipeline's body: nothing added (no `stream: false`), nothing dropped.
        expect(seen.body).toEqual(body);
        expect(seen.headers['authorization']).toBe(`Bearer ${API_KEY}`);
        expect(seen.headers['http-referer']).toBe(EXTRA_HEADERS['HTTP-Referer']);
        expect(seen.headers['x-title']).toBe(EXTRA_HEADERS['X-Title']);
        expect(seen.headers['x-request-id']).toBe('req-contract-1');
      });

      it('a 200 whose body is not JSON is bad_response', async () => {
        stub.configure({ malformedJson: true });
        const failure = await failureOf(client().complete(call(jsonBody())));
        expect(failure.kind).toBe('bad_response');
      });

      it('a 200 without an answer (no choices, or an empty list) is bad_response', async () => {
        // The stub always answers; a tiny upstream of its own sends what a broken one might.
        for (const answer of ['{"id":"x","object":"chat.completion","choices":[]}', '{"id":"x","object":"chat.completion"}']) {
          const upstream = createHttpServer((_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(answer));
          await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
          const address = upstream.address();
          if (address === null || typeof address === 'string') throw new Error('no port');
          try {
            const failure = await failureOf(client({ baseUrl: `http://127.0.0.1:${address.port}/v1` }).complete(call(jsonBody())));
            expect(failure.kind).toBe('bad_response');
          } finally {
            upstream.closeAllConnections();
            await new Promise<void>((resolve) => upstream.close(() => resolve()));
          }
        }
      });
    });

    describe('HTTP errors', () => {
      const expectedCodes: Record<number, string> = {
        400: 'invalid_request',
        401: 'invalid_api_key',
        402: 'insufficient_credits',
        404: 'not_found',
        429: 'rate_limit_exceeded',
        500: 'server_error',
        503: 'service_unavailable',
      };
      for (const status of [400, 401, 402, 404, 429, 500, 503]) {
        it(`HTTP ${status} is kind http with the status, the upstream's message and code`, async () => {
          stub.configure({ status });
          const failure = await failureOf(client().complete(call(jsonBody())));
          expect(failure).toMatchObject({ kind: 'http', status, retryAfterMs: undefined });
          expect(failure.message).toContain(`answered ${status}`);
          expect(failure.upstreamCode).toBe(expectedCodes[status]);
        });
      }

      it('a 429 with retry-after carries the delay (JSON and stream)', async () => {
        stub.configure({ status: 429, retryAfterSeconds: 2 });
        const json = await failureOf(client().complete(call(jsonBody())));
        expect(json).toMatchObject({ kind: 'http', status: 429, retryAfterMs: 2000 });
        const sse = await failureOf(client().stream(call(streamBody())));
        expect(sse).toMatchObject({ kind: 'http', status: 429, retryAfterMs: 2000 });
      });

      it('a stream refused with HTTP 503 fails before any event', async () => {
        stub.configure({ status: 503 });
        const failure = await failureOf(client().stream(call(streamBody())).then((events) => drain(events)));
        expect(failure).toMatchObject({ kind: 'http', status: 503 });
      });
    });

    describe('errors inside a 200 (OpenRouter reports failures once a model started so)', () => {
      it('a JSON body that is an error is kind http with the status its code names', async () => {
        stub.configure({ status: 402, errorInBody: true });
        const failure = await failureOf(client().complete(call(jsonBody())));
        expect(failure).toMatchObject({ kind: 'http', status: 402 });
        expect(failure.message).toContain('answered 402');
      });

      it('a JSON answer with a top-level error and a choice finished as "error" is kind http 502', async () => {
        stub.configure({ errorAfterChunks: 2 });
        const failure = await failureOf(client().complete(call(jsonBody())));
        // With the usage it reports for what it produced before failing, which the upstream bills.
        expect(failure).toMatchObject({ kind: 'http', status: 502, usage: { completion_tokens: 2 } });
      });

      it('a stream whose first event is an error fails with its status before yielding anything', async () => {
        stub.configure({ status: 429, errorInBody: true });
        const events: string[] = [];
        const failure = await failureOf(client().stream(call(streamBody())).then((s) => drain(s, events)));
        expect(failure).toMatchObject({ kind: 'http', status: 429 });
        expect(failure.message).toContain('answered 429');
        expect(events).toEqual([]);
      });

      it('an error event mid-stream yields the events before it, then fails as kind http 502', async () => {
        stub.configure({ errorAfterChunks: 3 });
        const events: string[] = [];
        const failure = await failureOf(client().stream(call(streamBody())).then((s) => drain(s, events)));
        expect(failure).toMatchObject({ kind: 'http', status: 502 });
        expect(events.map(parse).map((c) => c.choices?.[0].delta?.content)).toEqual(['', 'Mock ', 'reply ']);
      });

      it('a moderation 403 is flagged as such (JSON and stream); another 403 is not', async () => {
        stub.configure({ status: 403, flagged: true });
        expect(await failureOf(client().complete(call(jsonBody())))).toMatchObject({ kind: 'http', status: 403, flagged: true });
        expect(await failureOf(client().stream(call(streamBody())).then((s) => drain(s)))).toMatchObject({ kind: 'http', status: 403, flagged: true });
        stub.configure({ status: 403 });
        expect(await failureOf(client().complete(call(jsonBody())))).toMatchObject({ kind: 'http', status: 403, flagged: false });
      });

      it('keep-alives (SSE comments, whitespace before JSON) are not events: the answer after them is whole', async () => {
        stub.configure({ processingMs: 120 });
        expect((await client().complete(call(jsonBody()))).completion.choices[0].message.content).toBe(REPLY);
        const events = await drain(await client().stream(call(streamBody())));
        expect(events.map(parse).map((c) => c.choices?.[0]?.delta?.content ?? '').join('')).toBe(REPLY);
      });
    });

    describe('transport', () => {
      it('a stream that goes quiet after its first events is a timeout, with what came before it yielded', async () => {
        stub.configure({ chunkDelayMs: 30_000 });
        const seen: string[] = [];
        const started = performance.now();
        const failure = await failureOf(client().stream(call(streamBody())).then((events) => drain(events, seen)));
        expect(failure.kind).toBe('timeout');
        expect(seen.length).toBeGreaterThanOrEqual(1);
        expect(performance.now() - started).toBeLessThan(TIMEOUT_MS + TIMEOUT_SLACK_MS);
      });

      it('a hung upstream is a timeout within the configured timeout (JSON)', async () => {
        stub.configure({ hangMs: 30_000 });
        const started = performance.now();
        const failure = await failureOf(client().complete(call(jsonBody())));
        expect(failure.kind).toBe('timeout');
        const took = performance.now() - started;
        expect(took).toBeGreaterThanOrEqual(TIMEOUT_MS - 50);
        expect(took).toBeLessThan(TIMEOUT_MS + TIMEOUT_SLACK_MS);
      });

      it('a hung upstream is a timeout within the configured timeout (stream)', async () => {
        stub.configure({ hangMs: 30_000 });
        const started = performance.now();
        const failure = await failureOf(client().stream(call(streamBody())).then((events) => drain(events)));
        expect(failure.kind).toBe('timeout');
        const took = performance.now() - started;
        expect(took).toBeGreaterThanOrEqual(TIMEOUT_MS - 50);
        expect(took).toBeLessThan(TIMEOUT_MS + TIMEOUT_SLACK_MS);
      });

      it('a refused connection is kind connection', async () => {
        const port = await closedPort();
        const c = client({ baseUrl: `http://127.0.0.1:${port}/v1` });
        expect((await failureOf(c.complete(call(jsonBody())))).kind).toBe('connection');
        expect((await failureOf(c.stream(call(streamBody())).then((events) => drain(events)))).kind).toBe('connection');
      });

      it('a call waiting for a busy pool connection ends when its signal aborts (JSON and stream)', async () => {
        // Nothing answers: a driver without a pool of its own waits for the answer instead.
        stub.configure({ hangMs: 30_000 });
        const c = client({ timeoutMs: 10_000, connections: 1 });
        const holder = new AbortController();
        let held = true;
        // Takes the only connection (with a one-connection pool) and keeps it until aborted below.
        const holding = failureOf(c.complete(call(jsonBody(), holder.signal))).finally(() => (held = false));
        for (const body of [jsonBody(), streamBody()]) {
          const controller = new AbortController();
          const pending = failureOf(body.stream === true ? c.stream(call(body, controller.signal)).then((e) => drain(e)) : c.complete(call(body, controller.signal)));
          setTimeout(() => controller.abort(new UpstreamFailure('timeout', 'the deadline')), 50);
          expect((await pending).kind).toBe('timeout');
          expect(held).toBe(true);
        }
        holder.abort();
        expect((await holding).kind).toBe('aborted');
      });

      it('a stream whose [DONE] arrives in a burst of queued events gives its connection back', async () => {
        stub.configure({ completionTokens: 1000 });
        const c = client({ connections: 1 });
        const events = await drain(await c.stream(call({ ...streamBody(), max_tokens: 2000 })));
        expect(events.length).toBeGreaterThan(1000);
        stub.reset();
        // One connection: this call gets it only if the stream before it ended.
        const { completion } = await c.complete(call(jsonBody(), AbortSignal.timeout(5000)));
        expect(completion.choices[0]?.message.content).toBe(REPLY);
      });

      it('the caller aborting before the answer is kind aborted', async () => {
        stub.configure({ hangMs: 30_000 });
        const controller = new AbortController();
        const pending = failureOf(client({ timeoutMs: 10_000 }).complete(call(jsonBody(), controller.signal)));
        setTimeout(() => controller.abort(), 50);
        expect((await pending).kind).toBe('aborted');
      });
    });

    describe('stream', () => {
      it('yields each event in order, [DONE] excluded, and ends cleanly', async () => {
        const events = await drain(await client().stream(call(streamBody())));
        const chunks = events.map(parse);
        // role, one chunk per word (5), finish, usage
        expect(chunks).toHaveLength(8);
        expect(events).not.toContain('[DONE]');
        expect(chunks[0].choices?.[0].delta).toEqual({ role: 'assistant', content: '' });
        const text = chunks.map((c) => c.choices?.[0]?.delta?.content ?? '').join('');
        expect(text).toBe(REPLY);
        expect(chunks[6].choices?.[0].finish_reason).toBe('stop');
        expect(chunks[7].choices).toEqual([]);
        expect(chunks[7].usage?.completion_tokens).toBe(5);
      });

      it('sends the streaming body as given, with the key and extra headers', async () => {
        const body = streamBody();
        await drain(await client().stream(call(body)));
        const seen = stub.requests.at(-1);
        expect(seen?.body).toEqual(body);
        expect(seen?.headers['authorization']).toBe(`Bearer ${API_KEY}`);
        expect(seen?.headers['http-referer']).toBe(EXTRA_HEADERS['HTTP-Referer']);
        expect(seen?.headers['x-title']).toBe(EXTRA_HEADERS['X-Title']);
      });

      it('hands each event over as it arrives, not at the end', async () => {
        const gap = 120;
        stub.configure({ chunkDelayMs: gap, completionTokens: 3 });
        const started = performance.now();
        const at: number[] = [];
        for await (const data of await client().stream(call(streamBody()))) {
          expect(data).not.toBe('[DONE]');
          at.push(performance.now() - started);
        }
        // role, 3 words, finish, usage: 5 gaps on the wire, so the first event is long before the last.
        expect(at).toHaveLength(6);
        expect(at[5] - at[0]).toBeGreaterThanOrEqual(gap * 4);
        for (let i = 1; i < at.length; i++) expect(at[i] - at[i - 1]).toBeGreaterThanOrEqual(gap / 2);
      });

      it('a first event that is not JSON is bad_response', async () => {
        stub.configure({ malformedJson: true });
        const events: string[] = [];
        const failure = await failureOf(client().stream(call(streamBody())).then((s) => drain(s, events)));
        expect(failure.kind).toBe('bad_response');
        expect(events).toEqual([]);
      });

      // Framed like an object ({…}) but broken inside: an outline check alone would relay it.
      it('an event mid-stream that is not JSON yields the events before it, then fails as bad_response', async () => {
        stub.configure({ malformedAfterChunks: 2 });
        const events: string[] = [];
        const failure = await failureOf(client().stream(call(streamBody())).then((s) => drain(s, events)));
        expect(failure.kind).toBe('bad_response');
        expect(events.map(parse).map((c) => c.choices?.[0].delta?.content)).toEqual(['', 'Mock ']);
      });

      for (const chunkDelayMs of [0, 30]) {
        it(`a stream cut mid-way yields the events before the cut, then fails with kind cut (chunkDelayMs ${chunkDelayMs})`, async () => {
          stub.configure({ cutAfterChunks: 3, chunkDelayMs });
          const events: string[] = [];
          const failure = await failureOf(client().stream(call(streamBody())).then((s) => drain(s, events)));
          expect(failure.kind).toBe('cut');
          expect(events.map(parse).map((c) => c.choices?.[0].delta?.content)).toEqual(['', 'Mock ', 'reply ']);
        });
      }

      it('the caller aborting mid-stream ends it with the aborted failure', async () => {
        stub.configure({ chunkDelayMs: 100 });
        const controller = new AbortController();
        const events = await client({ timeoutMs: 10_000 }).stream(call(streamBody(), controller.signal));
        const iterator = events[Symbol.asyncIterator]();
        const first = await iterator.next();
        expect(first.done).toBe(false);
        controller.abort();
        const failure = await failureOf(iterator.next());
        expect(failure.kind).toBe('aborted');
      });

      it("the gateway's deadline aborting mid-stream ends it with the deadline's own failure", async () => {
        stub.configure({ chunkDelayMs: 100 });
        const controller = new AbortController();
        const events = await client({ timeoutMs: 10_000 }).stream(call(streamBody(), controller.signal));
        const iterator = events[Symbol.asyncIterator]();
        await iterator.next();
        const deadline = new UpstreamFailure('timeout', 'no answer within the upstream deadline');
        controller.abort(deadline);
        expect(await failureOf(iterator.next())).toBe(deadline);
      });
    });
  });
}
