import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { STUB_DEFAULT_PRICE, STUB_PRICES, startStubUpstream, stubCost } from './index.js';
import type { StubUpstream } from './index.js';

// Every test talks to a real server over loopback HTTP, exactly as the gateway would.

let stub: StubUpstream;

beforeEach(async () => {
  stub = await startStubUpstream();
});

afterEach(async () => {
  await stub.close();
});

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function chat(body: Record<string, unknown>, path = '/chat/completions'): Promise<Response> {
  return fetch(`${stub.url}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer test-key' },
    body: JSON.stringify(body),
  });
}

function origin(): string {
  return new URL(stub.url).origin;
}

const MESSAGES = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'Hello there, how are you today?' },
];
const PROMPT_CHARS = 'You are terse.'.length + 'Hello there, how are you today?'.length;
const EXPECTED_CONTENT = 'Mock reply to: Hello there, how are you today?';

interface ChatCompletion {
  id: string;
  object: string;
  created: number;
  model: string;
  choices: { index: number; message: { role: string; content: string }; finish_reason: string }[];
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number; cost?: number };
}

async function json<T>(res: Response): Promise<T> {
  return (await res.json()) as T;
}

/** Reads an SSE body frame by frame; `ended` is false when the connection broke mid-stream. */
async function readSse(res: Response): Promise<{ frames: string[]; ended: boolean }> {
  const reader: ReadableStreamDefaultReader<Uint8Array> | undefined = res.body?.getReader();
  if (!reader) throw new Error('no body');
  const decoder = new TextDecoder();
  let buffered = '';
  let ended = true;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
    }
  } catch {
    ended = false;
  }
  const frames = buffered
    .split('\n\n')
    .filter((f) => f !== '')
    .map((f) => {
      expect(f.startsWith('data: ')).toBe(true);
      return f.slice('data: '.length);
    });
  return { frames, ended };
}

interface Chunk {
  id: string;
  object: string;
  model: string;
  choices: { index: number; delta: { role?: string; content?: string }; finish_reason: string | null }[];
  usage?: ChatCompletion['usage'];
}

function parseChunks(frames: string[]): Chunk[] {
  return frames.filter((f) => f !== '[DONE]').map((f) => JSON.parse(f) as Chunk);
}

describe('stub upstream: JSON answers', () => {
  it('answers in the OpenAI shape with usage and OpenRouter cost', async () => {
    const res = await chat({ model: 'openai/gpt-4o-mini', messages: MESSAGES });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/json');
    const body = await json<ChatCompletion>(res);

    expect(Object.keys(body).sort()).toEqual(['choices', 'created', 'id', 'model', 'object', 'usage']);
    expect(body.id).toMatch(/^chatcmpl-/);
    expect(body.object).toBe('chat.completion');
    expect(body.model).toBe('openai/gpt-4o-mini');
    expect(Number.isInteger(body.created)).toBe(true);
    expect(body.choices).toEqual([
      { index: 0, message: { role: 'assistant', content: EXPECTED_CONTENT }, finish_reason: 'stop' },
    ]);

    const promptTokens = Math.ceil(PROMPT_CHARS / 4);
    const completionTokens = EXPECTED_CONTENT.split(' ').length;
    expect(body.usage.prompt_tokens).toBe(promptTokens);
    expect(body.usage.completion_tokens).toBe(completionTokens);
    expect(body.usage.total_tokens).toBe(promptTokens + completionTokens);
    expect(body.usage.cost).toBeCloseTo(promptTokens * 0.15e-6 + completionTokens * 0.6e-6, 15);
    expect(body.usage.cost).toBe(stubCost('openai/gpt-4o-mini', promptTokens, completionTokens));
  });

  it('gives every answer its own id', async () => {
    const a = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES }));
    const b = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES }));
    expect(a.id).not.toBe(b.id);
  });

  it('reads content given as an array of parts and prices unknown models at the default', async () => {
    const res = await chat({
      model: 'acme/unknown',
      messages: [{ role: 'user', content: [{ type: 'text', text: 'part one' }, { type: 'image_url', image_url: { url: 'x' } }, { type: 'text', text: 'part two' }] }],
    });
    const body = await json<ChatCompletion>(res);
    expect(body.choices[0]?.message.content).toBe('Mock reply to: part one part two');
    const { prompt_tokens: p, completion_tokens: c } = body.usage;
    expect(p).toBe(Math.ceil('part one part two'.length / 4));
    expect(body.usage.cost).toBeCloseTo(p * STUB_DEFAULT_PRICE.prompt + c * STUB_DEFAULT_PRICE.completion, 15);
  });

  it('uses only the first 60 characters of the last user message', async () => {
    const long = 'x'.repeat(100);
    const body = await json<ChatCompletion>(
      await chat({ model: 'm', messages: [{ role: 'user', content: 'first' }, { role: 'assistant', content: 'ok' }, { role: 'user', content: long }] }),
    );
    expect(body.choices[0]?.message.content).toBe(`Mock reply to: ${'x'.repeat(60)}`);
  });

  it('omits usage.cost with omitCost', async () => {
    stub.configure({ omitCost: true });
    const body = await json<ChatCompletion>(await chat({ model: 'openai/gpt-4o-mini', messages: MESSAGES }));
    expect(body.usage).not.toHaveProperty('cost');
    expect(body.usage.total_tokens).toBeGreaterThan(0);
  });

  it('truncates to max_tokens with finish_reason "length"', async () => {
    const body = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES, max_tokens: 3 }));
    expect(body.choices[0]?.message.content).toBe('Mock reply to:');
    expect(body.choices[0]?.finish_reason).toBe('length');
    expect(body.usage.completion_tokens).toBe(3);

    const roomy = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES, max_tokens: 500 }));
    expect(roomy.choices[0]?.finish_reason).toBe('stop');
    expect(roomy.choices[0]?.message.content).toBe(EXPECTED_CONTENT);
  });

  it('forces the completion token count, still capped by max_tokens', async () => {
    stub.configure({ completionTokens: 40 });
    const padded = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES }));
    expect(padded.usage.completion_tokens).toBe(40);
    expect(padded.choices[0]?.message.content.split(' ')).toHaveLength(40);
    expect(padded.choices[0]?.message.content.startsWith(EXPECTED_CONTENT)).toBe(true);
    expect(padded.choices[0]?.finish_reason).toBe('stop');

    const capped = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES, max_tokens: 10 }));
    expect(capped.usage.completion_tokens).toBe(10);
    expect(capped.choices[0]?.finish_reason).toBe('length');
  });

  it('wordBytes pads every word with letters, so the answer grows in bytes but not in tokens', async () => {
    stub.configure({ completionTokens: 20, wordBytes: 100 });
    const padded = await json<ChatCompletion>(await chat({ model: 'm', messages: MESSAGES }));
    const words = padded.choices[0]?.message.content.split(' ') ?? [];
    expect(words).toHaveLength(20);
    expect(words.every((w) => w.length === 100)).toBe(true);
    expect(words[0]).toBe(`Mock${'x'.repeat(96)}`);
    expect(padded.usage.completion_tokens).toBe(20);

    const { frames } = await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true }));
    const streamed = parseChunks(frames).map((c) => c.choices[0]?.delta.content ?? '');
    expect(streamed.join('')).toBe(padded.choices[0]?.message.content);
  });

  it('accepts /v1, bare and OpenRouter /api/v1 paths', async () => {
    const base = origin();
    for (const path of ['/v1/chat/completions', '/chat/completions', '/api/v1/chat/completions']) {
      const res = await fetch(`${base}${path}`, { method: 'POST', body: JSON.stringify({ model: 'm', messages: MESSAGES }) });
      expect(res.status).toBe(200);
      await res.arrayBuffer();
    }
    expect(stub.hits).toBe(3);
  });

  it('rejects a body without a model, and bad JSON, with 400 envelopes', async () => {
    const noModel = await chat({ messages: MESSAGES });
    expect(noModel.status).toBe(400);
    const err = await json<{ error: { message: string; type: string; code: string } }>(noModel);
    expect(err.error.type).toBe('invalid_request_error');
    expect(typeof err.error.message).toBe('string');
    expect(err.error.code).toBe('missing_model');

    const badJson = await fetch(`${stub.url}/chat/completions`, { method: 'POST', body: '{nope' });
    expect(badJson.status).toBe(400);
    await badJson.arrayBuffer();
  });

  it('answers unknown routes with a 404 envelope', async () => {
    const res = await fetch(`${stub.url}/embeddings`, { method: 'POST', body: '{}' });
    expect(res.status).toBe(404);
    const body = await json<{ error: { type: string } }>(res);
    expect(body.error.type).toBe('not_found_error');
  });

  it('lists models with OpenRouter decimal-string pricing', async () => {
    const res = await fetch(`${stub.url}/models`);
    expect(res.status).toBe(200);
    const body = await json<{ data: { id: string; name: string; pricing: { prompt: string; completion: string }; context_length: number }[] }>(res);
    const mini = body.data.find((m) => m.id === 'openai/gpt-4o-mini');
    expect(mini?.pricing).toEqual({ prompt: '0.00000015', completion: '0.0000006' });
    expect(mini?.context_length).toBeGreaterThan(0);
    const llama = body.data.find((m) => m.id === 'meta-llama/llama-3.1-8b-instruct');
    expect(llama?.pricing).toEqual({ prompt: '0.00000002', completion: '0.00000005' });
    expect(body.data.map((m) => m.id)).not.toContain('default');
    expect(body.data).toHaveLength(Object.keys(STUB_PRICES).length - 1);
  });

  // OpenRouter's costs are clean decimals; a float product (24 × 2.5e-6 = 0.00006000000000000001)
  // would reach the gateway's ledger and every test that compares a cost as that drift.
  it('reports usage.cost as the clean decimal, not a float product', async () => {
    expect(stubCost('openai/gpt-4o', 24, 0)).toBe(0.00006);
    expect(stubCost('anthropic/claude-3.5-sonnet', 3, 3)).toBe(0.000054);
    expect(stubCost('anthropic/claude-3-haiku', 12, 3)).toBe(0.00000675);
    expect(stubCost('mistralai/mistral-7b-instruct', 1000, 0)).toBe(0.00003);
    expect(stubCost('meta-llama/llama-3.1-8b-instruct', 24, 0)).toBe(0.00000048);
    const res = await chat({ model: 'anthropic/claude-3.5-sonnet', messages: [{ role: 'user', content: 'x' }], max_tokens: 3 });
    const body = await json<ChatCompletion>(res);
    expect([body.usage.prompt_tokens, body.usage.completion_tokens]).toEqual([1, 3]);
    expect(body.usage.cost).toBe(0.000048);
  });
});

// The gateway's built-in mock runs with knownModelsOnly, so a newcomer's typo is refused as
// OpenRouter refuses it (and the gateway answers 400 model_not_found), not answered and billed.
describe('stub upstream: knownModelsOnly', () => {
  let strict: StubUpstream;
  beforeEach(async () => {
    strict = await startStubUpstream({ knownModelsOnly: true });
  });
  afterEach(async () => {
    await strict.close();
  });
  const ask = (body: Record<string, unknown>) =>
    fetch(`${strict.url}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

  it("refuses an id GET /models does not list with OpenRouter's 400, a `models` list naming one as a whole", async () => {
    const typo = await ask({ model: 'foo/bar-9000', messages: MESSAGES });
    expect(typo.status).toBe(400);
    expect(await typo.json()).toEqual({ error: { code: 400, message: 'foo/bar-9000 is not a valid model ID' } });
    const listed = await ask({ model: 'openai/gpt-4o-mini', models: ['openai/gpt-4o-mini', 'foo/bar-9000'], messages: MESSAGES, stream: true });
    expect(listed.status).toBe(400);
    expect(await listed.json()).toMatchObject({ error: { message: 'foo/bar-9000 is not a valid model ID' } });
    // Neither the price table's `default` nor a bare name is an id OpenRouter lists.
    for (const model of ['default', 'gpt-4o-mini']) expect((await ask({ model, messages: MESSAGES })).status).toBe(400);
  });

  it('answers every id GET /models lists, as before', async () => {
    const listed = await json<{ data: { id: string }[] }>(await fetch(`${strict.url}/models`));
    expect(listed.data.length).toBeGreaterThan(0);
    for (const { id } of listed.data) {
      const res = await ask({ model: id, messages: MESSAGES });
      expect(res.status, id).toBe(200);
      expect((await json<ChatCompletion>(res)).model).toBe(id);
    }
    // A listed id with a variant suffix, as OpenRouter takes on any model; not an unlisted one.
    expect((await ask({ model: 'openai/gpt-4o-mini:nitro', messages: MESSAGES })).status).toBe(200);
    expect((await ask({ model: 'foo/bar-9000:free', messages: MESSAGES })).status).toBe(400);
    // The invalidModelId fault still refuses a listed id.
    strict.configure({ models: { 'openai/gpt-4o': { invalidModelId: true } } });
    expect((await ask({ model: 'openai/gpt-4o', messages: MESSAGES })).status).toBe(400);
  });

  it('is off by default: any model name is answered', async () => {
    expect((await chat({ model: 'foo/bar-9000', messages: MESSAGES })).status).toBe(200);
  });
});

describe('stub upstream: streaming', () => {
  it('streams word chunks whose concatenation equals the JSON content, then usage and [DONE]', async () => {
    const request = { model: 'anthropic/claude-3.5-sonnet', messages: MESSAGES };
    const plain = await json<ChatCompletion>(await chat(request));

    const res = await chat({ ...request, stream: true, stream_options: { include_usage: true } });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/event-stream');
    const { frames, ended } = await readSse(res);
    expect(ended).toBe(true);
    expect(frames.at(-1)).toBe('[DONE]');

    const chunks = parseChunks(frames);
    const first = chunks[0];
    expect(first?.object).toBe('chat.completion.chunk');
    expect(first?.choices[0]?.delta).toEqual({ role: 'assistant', content: '' });
    expect(first?.choices[0]?.finish_reason).toBeNull();
    for (const c of chunks) {
      expect(c.model).toBe('anthropic/claude-3.5-sonnet');
      expect(c.id).toBe(first?.id);
    }

    const content = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
    expect(content).toBe(plain.choices[0]?.message.content);
    // One chunk per word between the role chunk and the finish chunk.
    expect(chunks.length).toBe(1 + plain.usage.completion_tokens + 1 + 1);

    const finish = chunks.at(-2);
    expect(finish?.choices).toEqual([{ index: 0, delta: {}, finish_reason: 'stop' }]);
    const usageChunk = chunks.at(-1);
    expect(usageChunk?.choices).toEqual([]);
    expect(usageChunk?.usage).toEqual(plain.usage);
    expect(usageChunk?.usage?.cost).toBeGreaterThan(0);
  });

  it('sends no usage chunk unless stream_options.include_usage', async () => {
    const { frames } = await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true }));
    const chunks = parseChunks(frames);
    expect(chunks.some((c) => c.usage !== undefined)).toBe(false);
    expect(chunks.at(-1)?.choices[0]?.finish_reason).toBe('stop');
    expect(frames.at(-1)).toBe('[DONE]');
  });

  it('truncates streams to max_tokens with finish_reason "length"', async () => {
    const { frames } = await readSse(
      await chat({ model: 'm', messages: MESSAGES, stream: true, max_tokens: 2, stream_options: { include_usage: true } }),
    );
    const chunks = parseChunks(frames);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe('Mock reply');
    expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe('length');
    expect(chunks.at(-1)?.usage?.completion_tokens).toBe(2);
  });

  it('honours chunkDelayMs without changing the content', async () => {
    stub.configure({ chunkDelayMs: 5 });
    const { frames, ended } = await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true }));
    expect(ended).toBe(true);
    expect(frames.at(-1)).toBe('[DONE]');
    expect(parseChunks(frames).map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(EXPECTED_CONTENT);
  });

  it('malformedAfterChunks sends one broken frame framed like an object after N frames, then the rest', async () => {
    stub.configure({ malformedAfterChunks: 2 });
    const { frames, ended } = await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true }));
    expect(ended).toBe(true);
    expect(frames.at(-1)).toBe('[DONE]');
    const broken = frames[2] ?? '';
    expect(broken.startsWith('{') && broken.endsWith('}')).toBe(true);
    expect(() => JSON.parse(broken) as unknown).toThrow(SyntaxError);
    expect(parseChunks([...frames.slice(0, 2), ...frames.slice(3)]).map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(EXPECTED_CONTENT);
  });

  for (const chunkDelayMs of [0, 5]) {
    it(`cutAfterChunks drops the connection after N frames without [DONE] (chunkDelayMs ${chunkDelayMs})`, async () => {
      stub.configure({ cutAfterChunks: 3, chunkDelayMs });
      const res = await chat({ model: 'm', messages: MESSAGES, stream: true });
      expect(res.status).toBe(200);
      const { frames, ended } = await readSse(res);
      expect(ended).toBe(false);
      expect(frames).toHaveLength(3);
      expect(frames).not.toContain('[DONE]');
      expect(parseChunks(frames)[0]?.choices[0]?.delta.role).toBe('assistant');
    });
  }

  it('counts a stream in streamsFinished once its last byte left, not while a reader holds it back, never when cut', async () => {
    stub.configure({ completionTokens: 200, wordBytes: 64 * 1024 });
    const held = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(held.status).toBe(200);
    // ~13 MB nobody reads yet: more than the loopback socket buffers take.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(stub.streamsFinished).toBe(0);
    const { ended } = await readSse(held);
    expect(ended).toBe(true);
    // The stub hears of its last write's completion in a turn of its own.
    while (stub.streamsFinished === 0) await new Promise((resolve) => setTimeout(resolve, 5));

    stub.configure({ cutAfterChunks: 2 });
    expect((await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true }))).ended).toBe(false);
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(stub.streamsFinished).toBe(1);
    stub.reset();
    expect(stub.streamsFinished).toBe(0);
  });

  it('cutAfterChunks 0 drops the connection right after the headers', async () => {
    stub.configure({ cutAfterChunks: 0 });
    const res = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(res.status).toBe(200);
    const { frames, ended } = await readSse(res);
    expect(ended).toBe(false);
    expect(frames).toEqual([]);
  });
});

describe('stub upstream: faults', () => {
  it('falls back along OpenRouter `models` past a per-model 503', async () => {
    stub.configure({ models: { 'openai/gpt-4o-mini': { status: 503 } } });
    const res = await chat({ models: ['openai/gpt-4o-mini', 'anthropic/claude-3.5-sonnet'], route: 'fallback', messages: MESSAGES });
    expect(res.status).toBe(200);
    const body = await json<ChatCompletion>(res);
    expect(body.model).toBe('anthropic/claude-3.5-sonnet');
    expect(body.usage.cost).toBe(stubCost('anthropic/claude-3.5-sonnet', body.usage.prompt_tokens, body.usage.completion_tokens));
    expect(stub.hits).toBe(1);

    // The failing model alone still fails.
    const direct = await chat({ model: 'openai/gpt-4o-mini', messages: MESSAGES });
    expect(direct.status).toBe(503);
    await direct.arrayBuffer();
  });

  it("answers the last model's error when every fallback fails", async () => {
    stub.configure({ models: { a: { status: 503 }, b: { status: 502 } } });
    const res = await chat({ models: ['a', 'b'], route: 'fallback', messages: MESSAGES });
    expect(res.status).toBe(502);
    const body = await json<{ error: { message: string; type: string; code: string } }>(res);
    expect(body.error.type).toBe('server_error');
    expect(body.error.message).toContain('b');
  });

  it('failTimes fails the first N requests per model, then answers', async () => {
    stub.configure({ status: 500, failTimes: 2 });
    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await chat({ model: 'm1', messages: MESSAGES });
      statuses.push(res.status);
      await res.arrayBuffer();
    }
    expect(statuses).toEqual([500, 500, 200]);

    // The counter is per model: another model gets its own two failures.
    const other = await chat({ model: 'm2', messages: MESSAGES });
    expect(other.status).toBe(500);
    await other.arrayBuffer();

    // configure() restarts the counters.
    stub.configure({ status: 500, failTimes: 1 });
    const again = await chat({ model: 'm1', messages: MESSAGES });
    expect(again.status).toBe(500);
    await again.arrayBuffer();
    expect(stub.hits).toBe(5);
  });

  it('answers 429 with retry-after in the OpenAI envelope', async () => {
    stub.configure({ status: 429, retryAfterSeconds: 7 });
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('7');
    const body = await json<{ error: { message: string; type: string; code: string } }>(res);
    expect(body.error).toEqual({ message: expect.any(String), type: 'rate_limit_error', code: 'rate_limit_exceeded' });
  });

  it('lets per-model overrides win over globals', async () => {
    stub.configure({ status: 500, models: { healthy: { status: 503, failTimes: 0 }, slow: { latencyMs: 1 } } });
    const healthy = await chat({ model: 'healthy', messages: MESSAGES });
    expect(healthy.status).toBe(200);
    await healthy.arrayBuffer();
    // Unset keys of an override inherit the globals.
    const slow = await chat({ model: 'slow', messages: MESSAGES });
    expect(slow.status).toBe(500);
    await slow.arrayBuffer();
  });

  it('malformedJson returns 200 with a body that is not JSON', async () => {
    stub.configure({ malformedJson: true });
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(() => JSON.parse(text) as unknown).toThrow();
  });

  it('emptyAnswer returns 200 and JSON with no message, and a stream with nothing before [DONE]', async () => {
    stub.configure({ emptyAnswer: true });
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { choices: Array<Record<string, unknown>> };
    expect(body.choices).toHaveLength(1);
    expect(body.choices[0]).not.toHaveProperty('message');
    const stream = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(stream.status).toBe(200);
    expect(await stream.text()).toBe('data: [DONE]\n\n');
  });

  it('latencyMs delays the answer', async () => {
    stub.configure({ latencyMs: 120 });
    const started = performance.now();
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(performance.now() - started).toBeGreaterThanOrEqual(110);
    expect(res.status).toBe(200);
    await res.arrayBuffer();

    const streamStarted = performance.now();
    const stream = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(performance.now() - streamStarted).toBeGreaterThanOrEqual(110);
    await stream.arrayBuffer();
  });

  it('hangMs holds the answer back, then answers normally', async () => {
    stub.configure({ hangMs: 80 });
    const started = performance.now();
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(performance.now() - started).toBeGreaterThanOrEqual(70);
    expect(res.status).toBe(200);
    await res.arrayBuffer();
  });

  it('script answers what it takes (counted and recorded), leaves the rest to the stub, and reset() clears it', async () => {
    stub.script = (_req, body, res) => {
      if (body.model !== 'scripted') return false;
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('from the script');
      return true;
    };
    const scripted = await chat({ model: 'scripted', messages: MESSAGES });
    expect(await scripted.text()).toBe('from the script');
    const left = await chat({ model: 'm', messages: MESSAGES });
    expect(((await left.json()) as ChatCompletion).choices[0].message.content).toBe(EXPECTED_CONTENT);
    expect(stub.hits).toBe(2);
    expect(stub.requests.map((r) => (r.body as { model?: string }).model)).toEqual(['scripted', 'm']);
    stub.reset();
    const after = await chat({ model: 'scripted', messages: MESSAGES });
    expect(after.headers.get('content-type')).toContain('application/json');
    await after.arrayBuffer();
  });

  it('close() is prompt even with a hanging request open', async () => {
    stub.configure({ hangMs: 60_000 });
    const pending = chat({ model: 'm', messages: MESSAGES });
    const outcome = pending.then(
      () => 'answered',
      () => 'failed',
    );
    while (stub.hits === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    await stub.close();
    expect(await outcome).toBe('failed');
    // A second close() is harmless (afterEach calls it again).
    await stub.close();
  });
});

describe('stub upstream: bookkeeping and control surface', () => {
  it('counts every chat request, including failed ones, and records them', async () => {
    stub.configure({ models: { bad: { status: 503 } } });
    await (await chat({ model: 'ok', messages: MESSAGES })).arrayBuffer();
    await (await chat({ model: 'bad', messages: MESSAGES })).arrayBuffer();
    await (await chat({ messages: MESSAGES })).arrayBuffer();
    await (await fetch(`${stub.url}/models`)).arrayBuffer();
    expect(stub.hits).toBe(3);

    expect(stub.requests).toHaveLength(3);
    const first = stub.requests[0];
    expect(first?.method).toBe('POST');
    expect(first?.path).toBe('/v1/chat/completions');
    expect(first?.headers['authorization']).toBe('Bearer test-key');
    expect(isRecord(first?.body) && first.body['model']).toBe('ok');
    expect(typeof first?.at).toBe('number');

    stub.reset();
    expect(stub.hits).toBe(0);
    expect(stub.requests).toHaveLength(0);
    const healed = await chat({ model: 'bad', messages: MESSAGES });
    expect(healed.status).toBe(200);
    await healed.arrayBuffer();
  });

  it('keeps only the last 200 requests', async () => {
    for (let i = 0; i < 205; i++) await (await chat({ model: `m${i}`, messages: MESSAGES })).arrayBuffer();
    expect(stub.hits).toBe(205);
    expect(stub.requests).toHaveLength(200);
    const oldest = stub.requests[0]?.body;
    expect(isRecord(oldest) && oldest['model']).toBe('m5');
  });

  it('records nothing with recordRequests: false', async () => {
    const lean = await startStubUpstream({ recordRequests: false, config: { completionTokens: 3 } });
    try {
      const res = await fetch(`${lean.url}/chat/completions`, { method: 'POST', body: JSON.stringify({ model: 'm', messages: MESSAGES }) });
      const body = await json<ChatCompletion>(res);
      expect(body.usage.completion_tokens).toBe(3);
      expect(lean.hits).toBe(1);
      expect(lean.requests).toHaveLength(0);
    } finally {
      await lean.close();
    }
  });

  it('is driven over HTTP: /__stub/config, /__stub/stats, /__stub/reset', async () => {
    const base = origin();
    const configured = await fetch(`${base}/__stub/config`, {
      method: 'POST',
      body: JSON.stringify({ status: 503, models: { good: { status: 429, failTimes: 0 } } }),
    });
    expect(configured.status).toBe(200);
    await configured.arrayBuffer();

    const failed = await chat({ model: 'm', messages: MESSAGES });
    expect(failed.status).toBe(503);
    await failed.arrayBuffer();
    const good = await chat({ model: 'good', messages: MESSAGES, stream: true });
    expect(good.status).toBe(200);
    await good.arrayBuffer();

    expect(await json<unknown>(await fetch(`${base}/__stub/stats`))).toEqual({ hits: 2, streamsFinished: 1 });

    const reset = await fetch(`${base}/__stub/reset`, { method: 'POST' });
    expect(reset.status).toBe(200);
    await reset.arrayBuffer();
    expect(await json<unknown>(await fetch(`${base}/__stub/stats`))).toEqual({ hits: 0, streamsFinished: 0 });
    const healed = await chat({ model: 'm', messages: MESSAGES });
    expect(healed.status).toBe(200);
    await healed.arrayBuffer();
  });

  it('rejects invalid configs over HTTP and keeps the previous one', async () => {
    stub.configure({ status: 502 });
    for (const bad of ['{nope', JSON.stringify({ latencyMs: -1 }), JSON.stringify({ statsu: 500 }), JSON.stringify({ status: 200 })]) {
      const res = await fetch(`${origin()}/__stub/config`, { method: 'POST', body: bad });
      expect(res.status).toBe(400);
      const body = await json<{ error: { code: string } }>(res);
      expect(body.error.code).toBe('invalid_config');
    }
    const still = await chat({ model: 'm', messages: MESSAGES });
    expect(still.status).toBe(502);
    await still.arrayBuffer();
  });

  it('configure() validates its input', () => {
    expect(() => stub.configure({ latencyMs: Number.NaN })).toThrow(TypeError);
    expect(() => stub.configure({ answerModel: '' })).toThrow(TypeError);
    expect(() => stub.configure({ errorInBody: 'yes' } as unknown as Parameters<StubUpstream['configure']>[0])).toThrow(TypeError);
  });

  it('answerModel names another model in the answer (JSON and stream), priced as the model asked', async () => {
    stub.configure({ answerModel: 'openai/gpt-4o-mini-2024-07-18' });
    const body = await json<ChatCompletion>(await chat({ model: 'openai/gpt-4o-mini', messages: MESSAGES }));
    expect(body.model).toBe('openai/gpt-4o-mini-2024-07-18');
    expect(body.usage.cost).toBeCloseTo(stubCost('openai/gpt-4o-mini', body.usage.prompt_tokens, body.usage.completion_tokens), 15);
    const { frames } = await readSse(await chat({ model: 'openai/gpt-4o-mini', messages: MESSAGES, stream: true }));
    expect(parseChunks(frames).every((c) => c.model === 'openai/gpt-4o-mini-2024-07-18')).toBe(true);
  });

  it('errorNull puts "error": null in a successful JSON answer and in every stream chunk', async () => {
    stub.configure({ errorNull: true });
    const body = await json<ChatCompletion & { error?: unknown }>(await chat({ model: 'm', messages: MESSAGES }));
    expect(body.error).toBeNull();
    expect(body.choices[0]?.finish_reason).toBe('stop');
    const { frames } = await readSse(await chat({ model: 'm', messages: MESSAGES, stream: true, stream_options: { include_usage: true } }));
    const chunks = parseChunks(frames);
    expect(chunks.length).toBeGreaterThan(2);
    expect(chunks.every((c) => 'error' in c && (c as { error?: unknown }).error === null)).toBe(true);
  });

  it("invalidModelId refuses any request naming the id, its `models` list included, with OpenRouter's 400", async () => {
    stub.configure({ models: { 'x/retired': { invalidModelId: true } } });
    const named = await chat({ model: 'x/retired', messages: MESSAGES });
    expect(named.status).toBe(400);
    expect(await named.json()).toEqual({ error: { code: 400, message: 'x/retired is not a valid model ID' } });
    // OpenRouter checks the whole list before routing: the good model first does not save it.
    const listed = await chat({ model: 'm', models: ['m', 'x/retired'], messages: MESSAGES, stream: true });
    expect(listed.status).toBe(400);
    expect(await listed.json()).toMatchObject({ error: { message: 'x/retired is not a valid model ID' } });
    expect((await chat({ model: 'm', messages: MESSAGES })).status).toBe(200);
  });

  it('errorInBody answers 200 with the error in the body (JSON), or as the first event of a stream', async () => {
    stub.configure({ status: 402, errorInBody: true });
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ error: { code: 402, message: 'Stub upstream fault: m answered 402' } });
    const streamed = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(streamed.status).toBe(200);
    const { frames } = await readSse(streamed);
    expect(frames).toHaveLength(2);
    expect(JSON.parse(frames[0] ?? '')).toMatchObject({ error: { code: 402 }, choices: [{ finish_reason: 'error' }] });
    expect(frames[1]).toBe('[DONE]');
  });

  it('errorInBody without a status carries a 502 error, in JSON and in a stream', async () => {
    stub.configure({ errorInBody: true });
    const res = await chat({ model: 'm', messages: MESSAGES });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ error: { code: 502, message: 'Stub upstream fault: m answered 502' } });
    const streamed = await chat({ model: 'm', messages: MESSAGES, stream: true });
    expect(streamed.status).toBe(200);
    const { frames } = await readSse(streamed);
    expect(frames).toHaveLength(2);
    expect(JSON.parse(frames[0] ?? '')).toMatchObject({ error: { code: 502 }, choices: [{ finish_reason: 'error' }] });
  });
});
