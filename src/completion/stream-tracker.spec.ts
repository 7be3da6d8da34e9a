import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { readUsage, SseParser, type Usage } from '../../libs/openai-contract/src/index.js';
import { startStubUpstream, type StubUpstream } from '../../libs/stub-upstream/src/index.js';
import { assembleCompletion } from '../cache/stream-replay.js';
import { StreamTracker } from './stream-tracker.js';

/** What the tracker must agree with: every event read in full, the last model and usage win. */
function reference(payloads: readonly string[]) {
  let model: string | undefined;
  let usage: Usage | undefined;
  let contentBytes = 0;
  const usageOnly: boolean[] = [];
  for (const payload of payloads) {
    const chunk = JSON.parse(payload) as { model?: unknown; choices?: unknown; usage?: unknown };
    if (typeof chunk.model === 'string') model = chunk.model;
    if (Array.isArray(chunk.choices)) {
      for (const choice of chunk.choices as Array<{ delta?: Record<string, unknown> } | null>) {
        const delta = choice?.delta;
        if (typeof delta !== 'object' || delta === null) continue;
        // What the model produced, whichever field carries it: text, reasoning, a refusal, tool-call arguments.
        for (const field of ['content', 'reasoning', 'reasoning_content', 'refusal']) {
          const text = delta[field];
          if (typeof text === 'string') contentBytes += Buffer.byteLength(text);
        }
        if (Array.isArray(delta.tool_calls)) {
          for (const call of delta.tool_calls as Array<{ function?: { arguments?: unknown } } | null>) {
            const args = call?.function?.arguments;
            if (typeof args === 'string') contentBytes += Buffer.byteLength(args);
          }
        }
      }
    }
    const found = chunk.usage ? readUsage(chunk) : undefined;
    if (found) usage = found;
    usageOnly.push(found !== undefined && Array.isArray(chunk.choices) && chunk.choices.length === 0);
  }
  return { model, usage, contentBytes, usageOnly };
}

/** Every event handed over parsed, as the drivers hand them (each one a JSON object: they refuse any other). */
function track(payloads: readonly string[], assemble: boolean) {
  const tracker = new StreamTracker(assemble);
  const usageOnly = payloads.map((p) => tracker.observe(JSON.parse(p) as object));
  return { tracker, view: { model: tracker.model, usage: tracker.usage, contentBytes: tracker.contentBytes, usageOnly } };
}

const USAGE = { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10, cost: 0.00001 };
const chunk = (fields: Record<string, unknown>, delta: Record<string, unknown> | undefined, finish: string | null = null) =>
  JSON.stringify({
    id: 'gen-1',
    provider: 'OpenAI',
    model: 'openai/gpt-4o-mini',
    object: 'chat.completion.chunk',
    created: 1764400000,
    choices: delta === undefined ? [] : [{ index: 0, delta, finish_reason: finish, native_finish_reason: finish, logprobs: null }],
    ...fields,
  });
const words = ['Hel', 'lo ', 'wörld ', '😀 ', 'say "hi"\n', '\\o/'];

/** The three ways an upstream reports usage on a stream, as OpenRouter and OpenAI send them. */
const shapes: Record<string, string[]> = {
  'usage: null in every chunk, then a usage-only chunk': [
    chunk({ usage: null }, { role: 'assistant', content: '' }),
    ...words.map((w) => chunk({ usage: null }, { role: 'assistant', content: w, reasoning: null, reasoning_details: [] })),
    chunk({ usage: null }, { role: 'assistant', content: '' }, 'stop'),
    chunk({ usage: USAGE }, undefined),
  ],
  'usage in the last content chunk': [
    ...words.map((w) => chunk({}, { content: w })),
    chunk({ usage: { ...USAGE, cost: '0.00002' } }, { content: '!' }, 'stop'),
  ],
  'a separate usage-only chunk after chunks without usage': [
    chunk({}, { role: 'assistant', content: '' }),
    ...words.map((w) => chunk({}, { content: w })),
    chunk({}, {}, 'length'),
    chunk({ usage: USAGE }, undefined),
  ],
};

describe('StreamTracker', () => {
  for (const [shape, payloads] of Object.entries(shapes)) {
    describe(shape, () => {
      it.each([true, false])('reads usage, model, content and the usage-only verdict exactly (assemble=%s)', (assemble) => {
        const { tracker, view } = track(payloads, assemble);
        expect(view).toEqual(reference(payloads));
        expect(view.usage?.total_tokens).toBe(10);
        expect(view.model).toBe('openai/gpt-4o-mini');
        expect(view.contentBytes).toBe(Buffer.byteLength(words.join('')) + (shape.startsWith('usage in the last') ? 1 : 0));
        // Assembled only when asked to, and then exactly what assembling the raw payloads gives.
        expect(tracker.completion()).toEqual(assemble ? assembleCompletion(payloads) : undefined);
      });
    });
  }

  it('hands the cache the completion the stream amounts to', () => {
    const completion = track(shapes['usage: null in every chunk, then a usage-only chunk'] ?? [], true).tracker.completion();
    expect(completion?.choices).toEqual([{ index: 0, message: { role: 'assistant', content: words.join('') }, finish_reason: 'stop', logprobs: null }]);
    expect(completion?.usage).toEqual(USAGE);
    expect(completion?.provider).toBe('OpenAI');
  });

  it.each([true, false])('counts what a cut stream produced, and offers nothing to cache (assemble=%s)', (assemble) => {
    const cut = words.map((w) => chunk({}, { content: w }));
    const { tracker, view } = track(cut, assemble);
    expect(view).toEqual(reference(cut));
    expect(view.usage).toBeUndefined();
    expect(view.contentBytes).toBe(Buffer.byteLength(words.join('')));
    expect(tracker.completion()).toBeUndefined();
  });

  it.each([true, false])('survives chunks whose choices are odd, and never caches such a stream (assemble=%s)', (assemble) => {
    const payloads = [
      '{"choices":[null,{"delta":null},{"delta":{"content":"ok"}}]}',
      '{"choices":"usage","usage":null}',
      ...(shapes['a separate usage-only chunk after chunks without usage'] ?? []),
    ];
    const { tracker, view } = track(payloads, assemble);
    expect(view).toEqual(reference(payloads));
    expect(view.usage).toEqual(USAGE);
    expect(view.contentBytes).toBe(2 + Buffer.byteLength(words.join('')));
    expect(tracker.completion()).toBeUndefined();
  });

  it.each([true, false])('counts what a cut stream of reasoning, a refusal or tool calls produced, not only content (assemble=%s)', (assemble) => {
    const reasoning = ['Let ', 'me ', 'think ', 'about ', 'this.'];
    const cut = [
      chunk({ usage: null }, { role: 'assistant', content: '' }),
      ...reasoning.map((r) => chunk({ usage: null }, { role: 'assistant', content: '', reasoning: r })),
      // DeepSeek's and vLLM's name for it.
      chunk({ usage: null }, { reasoning_content: 'Ünd so. ' }),
      chunk({ usage: null }, { refusal: 'I cannot.' }),
      chunk({ usage: null }, { tool_calls: [{ index: 0, id: 't', type: 'function', function: { name: 'lookup', arguments: '{"q":' } }] }),
      chunk({ usage: null }, { tool_calls: [{ index: 0, function: { arguments: '"x"}' } }] }),
    ];
    const { view } = track(cut, assemble);
    expect(view).toEqual(reference(cut));
    expect(view.contentBytes).toBe(reasoning.join('').length + Buffer.byteLength('Ünd so. ') + 'I cannot.'.length + '{"q":"x"}'.length);
  });

  // The upstream driver parsed every event already to check it: the tracker reads that parse, so a
  // streamed miss parses each event once, not once in the driver and again here.
  it.each([true, false])('reads the parse the driver hands it without parsing the event again or changing it (assemble=%s)', (assemble) => {
    const payloads = shapes['usage: null in every chunk, then a usage-only chunk'] ?? [];
    const parsed = payloads.map((p) => JSON.parse(p) as object);
    const copies = structuredClone(parsed);
    const tracker = new StreamTracker(assemble);
    const parse = vi.spyOn(JSON, 'parse');
    let usageOnly: boolean[];
    try {
      usageOnly = parsed.map((chunk) => tracker.observe(chunk));
      expect(parse).not.toHaveBeenCalled();
    } finally {
      parse.mockRestore();
    }
    const view = { model: tracker.model, usage: tracker.usage, contentBytes: tracker.contentBytes, usageOnly };
    expect(view).toEqual(reference(payloads));
    expect(tracker.completion()).toEqual(assemble ? assembleCompletion(payloads) : undefined);
    // Read only: the same objects are the driver's, and the caller read the first one's model.
    expect(parsed).toEqual(copies);
  });

  it('stops assembling once the stream cannot be replayed, and still reads it exactly', () => {
    const payloads = [
      chunk({}, { role: 'assistant', content: 'a' }),
      chunk({}, { tool_calls: [{ index: 0, id: 't', function: { name: 'f', arguments: '{}' } }] }),
      chunk({}, { content: 'b' }),
      chunk({}, {}, 'tool_calls'),
      chunk({ usage: USAGE }, undefined),
    ];
    const { tracker, view } = track(payloads, true);
    expect(view).toEqual(reference(payloads));
    expect(tracker.completion()).toBeUndefined();
  });
});

describe('StreamTracker on the stub upstream', () => {
  let stub: StubUpstream;
  beforeAll(async () => {
    stub = await startStubUpstream({ recordRequests: false });
  });
  afterAll(async () => {
    await stub.close();
  });

  async function events(body: Record<string, unknown>): Promise<string[]> {
    const response = await fetch(`${stub.url}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content: 'Stream some words for the tracker' }], stream: true, ...body }),
    });
    const parser = new SseParser();
    const out: string[] = [];
    try {
      for await (const bytes of response.body as unknown as AsyncIterable<Uint8Array>) out.push(...parser.push(bytes));
    } catch {
      // A cut stream ends with a socket error: what arrived before it is what counts.
    }
    // What a driver hands on: the events before [DONE], up to the first that is not a JSON object
    // (a cut may leave half an event, which a driver refuses, ending the stream there).
    const events: string[] = [];
    for (const payload of [...out, ...parser.flush()]) {
      if (payload === '[DONE]' || !isObject(payload)) break;
      events.push(payload);
    }
    return events;
  }

  it.each([
    ['with usage', { stream_options: { include_usage: true } }],
    ['without usage', {}],
    ['cut after 3 events', { stream_options: { include_usage: true } }, 3],
  ])('agrees with a full parse of every event (%s)', async (_name, body, cutAfterChunks?: number) => {
    stub.configure(cutAfterChunks === undefined ? {} : { cutAfterChunks });
    const payloads = await events(body);
    expect(payloads.length).toBeGreaterThan(2);
    for (const assemble of [true, false]) {
      const { tracker, view } = track(payloads, assemble);
      expect(view).toEqual(reference(payloads));
      expect(tracker.completion()).toEqual(assemble ? assembleCompletion(payloads) : undefined);
    }
    if (cutAfterChunks === undefined) expect(track(payloads, true).tracker.completion()?.choices[0]?.message.content).toMatch(/^Mock reply to: /);
  });
});

function isObject(payload: string): boolean {
  try {
    const value: unknown = JSON.parse(payload);
    return typeof value === 'object' && value !== null && !Array.isArray(value);
  } catch {
    return false;
  }
}
