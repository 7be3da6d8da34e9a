import { describe, expect, it } from 'vitest';
import { assembleCompletion, replayChunks, StreamAssembler } from './stream-replay.js';

const chunk = (delta: Record<string, unknown>, finish: string | null = null, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ id: 'c1', object: 'chat.completion.chunk', created: 1, model: 'm', choices: [{ index: 0, delta, finish_reason: finish }], ...extra });
const usage = JSON.stringify({
  id: 'c1',
  object: 'chat.completion.chunk',
  created: 1,
  model: 'm',
  choices: [],
  usage: { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 },
});

describe('assembleCompletion', () => {
  it('turns a finished stream into the completion it amounts to', () => {
    const completion = assembleCompletion([
      chunk({ role: 'assistant', content: '' }),
      chunk({ content: 'Hel' }),
      chunk({ content: 'lo' }),
      chunk({}, 'stop'),
      usage,
    ]);
    expect(completion).toEqual({
      id: 'c1',
      object: 'chat.completion',
      created: 1,
      model: 'm',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Hello' }, finish_reason: 'stop', logprobs: null }],
      usage: { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 },
    });
  });

  it.each([
    ['an error event', [chunk({ content: 'a' }), JSON.stringify({ error: { message: 'cut' } })]],
    ['a choice finished as "error"', [chunk({ content: 'a' }), chunk({}, 'error')]],
    ['tool calls', [chunk({ tool_calls: [{ index: 0, id: 't' }] }), chunk({}, 'tool_calls')]],
    ['no finish_reason (cut)', [chunk({ content: 'a' })]],
    ['broken JSON', ['{nope']],
    ['nothing', []],
  ])('refuses %s', (_name, payloads) => {
    expect(assembleCompletion(payloads)).toBeUndefined();
  });
});

describe('StreamAssembler', () => {
  it('assembles several choices, in index order, with refusal and reasoning, keeping extra fields of the first chunk', () => {
    const assembler = new StreamAssembler();
    const parts = [
      {
        id: 'c2',
        object: 'chat.completion.chunk',
        created: 5,
        model: 'm',
        system_fingerprint: 'fp',
        choices: [{ index: 1, delta: { role: 'assistant', reasoning: 'think' } }],
      },
      { id: 'c2', choices: [{ index: 0, delta: { content: 'A', tool_calls: [] }, logprobs: null }] },
      {
        id: 'c2',
        choices: [
          { index: 1, delta: { refusal: 'no', content: null } },
          { index: 0, delta: { content: 'B' }, finish_reason: 'stop' },
        ],
      },
      { id: 'c2', choices: [{ index: 1, delta: {}, finish_reason: 'content_filter' }] },
    ];
    for (const part of parts) expect(assembler.add(part)).toBe(true);
    expect(assembler.result()).toEqual({
      system_fingerprint: 'fp',
      id: 'c2',
      object: 'chat.completion',
      created: 5,
      model: 'm',
      choices: [
        { index: 0, message: { role: 'assistant', content: 'AB' }, finish_reason: 'stop', logprobs: null },
        { index: 1, message: { role: 'assistant', content: null, refusal: 'no', reasoning: 'think' }, finish_reason: 'content_filter', logprobs: null },
      ],
    });
    expect(assembler.result()).toEqual(assembleCompletion(parts.map((p) => JSON.stringify(p))));
  });

  it.each([
    ['logprobs of an unknown shape', { choices: [{ index: 0, delta: { content: 'a' }, logprobs: { tokens: ['a'], token_logprobs: [-0.1] } }] }],
    ['logprobs that are not a list', { choices: [{ index: 0, delta: { content: 'a' }, logprobs: { content: 'a' } }] }],
    ['a choice without index', { choices: [{ delta: { content: 'a' } }] }],
    ['a role that is not text', { choices: [{ index: 0, delta: { role: 1 } }] }],
    ['a chunk that is not an object', null],
  ])('refuses %s for good, whatever follows', (_name, bad) => {
    const assembler = new StreamAssembler();
    expect(assembler.add({ id: 'c', choices: [{ index: 0, delta: { content: 'a' } }] })).toBe(true);
    expect(assembler.add(bad)).toBe(false);
    expect(assembler.replayable).toBe(false);
    expect(assembler.add({ id: 'c', choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] })).toBe(false);
    expect(assembler.result()).toBeUndefined();
  });

  it("joins the chunks' logprobs, in order, into the lists a JSON answer carries", () => {
    const token = (t: string) => ({ token: t, logprob: -0.5, bytes: [...Buffer.from(t)], top_logprobs: [{ token: t, logprob: -0.5, bytes: null }] });
    const assembler = new StreamAssembler();
    const parts = [
      { id: 'c3', choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null }] },
      { id: 'c3', choices: [{ index: 0, delta: { content: 'Hel' }, logprobs: { content: [token('Hel')], refusal: null } }] },
      { id: 'c3', choices: [{ index: 0, delta: { content: 'lo' }, logprobs: { content: [token('lo')] } }] },
      { id: 'c3', choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] },
    ];
    for (const part of parts) expect(assembler.add(part)).toBe(true);
    expect(assembler.result()?.choices).toEqual([
      { index: 0, message: { role: 'assistant', content: 'Hello' }, finish_reason: 'stop', logprobs: { content: [token('Hel'), token('lo')], refusal: null } },
    ]);
  });

  it('refuses a stream with an event that was not JSON', () => {
    const assembler = new StreamAssembler();
    assembler.add({ id: 'c', choices: [{ index: 0, delta: { content: 'a' }, finish_reason: 'stop' }] });
    assembler.refuse();
    expect(assembler.result()).toBeUndefined();
  });
});

describe('replayChunks', () => {
  const completion = assembleCompletion([chunk({ role: 'assistant', content: 'Hi there' }), chunk({}, 'stop'), usage]);

  it('replays role, text and finish, and the usage chunk only when asked', () => {
    if (!completion) throw new Error('fixture');
    const quiet = replayChunks(completion, false).map(
      (p) => JSON.parse(p) as { choices: Array<{ delta: Record<string, unknown>; finish_reason: string | null }>; usage?: unknown },
    );
    expect(quiet.map((c) => c.choices[0]?.delta)).toEqual([{ role: 'assistant', content: '' }, { content: 'Hi there' }, {}]);
    expect(quiet.at(-1)?.choices[0]?.finish_reason).toBe('stop');
    expect(quiet.every((c) => c.usage === undefined)).toBe(true);
    const loud = replayChunks(completion, true).map((p) => JSON.parse(p) as { choices: unknown[]; usage?: unknown });
    expect(loud.at(-1)).toMatchObject({ choices: [], usage: { total_tokens: 5 } });
    // Round trip: what a replay sends assembles back to the same completion.
    expect(assembleCompletion(replayChunks(completion, true))).toEqual(completion);
  });

  it("carries a choice's logprobs on its text chunk, as OpenAI streams them, so a stream hit has what the JSON miss had", () => {
    const logprobs = { content: [{ token: 'Hi', logprob: -0.1, bytes: [72, 105], top_logprobs: [] }], refusal: null };
    const json = {
      id: 'c4',
      object: 'chat.completion' as const,
      created: 1,
      model: 'm',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Hi' }, finish_reason: 'stop', logprobs }],
    };
    const chunks = replayChunks(json, false).map((p) => JSON.parse(p) as { choices: Array<{ delta: unknown; logprobs?: unknown }> });
    expect(chunks.map((c) => c.choices[0])).toEqual([
      { index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null },
      { index: 0, delta: { content: 'Hi' }, finish_reason: null, logprobs },
      { index: 0, delta: {}, finish_reason: 'stop' },
    ]);
    expect(assembleCompletion(replayChunks(json, false))).toEqual(json);
  });
});
