import { describe, expect, it } from 'vitest';
import { describeUpstreamError, eventFailure, jsonResult, UpstreamFailure, withholdUpstreamKey } from './llm-client.js';

/** A stream event's text as both drivers read it: parsed, then eventFailure. */
const errorEventFailure = (data: string) => eventFailure(JSON.parse(data));

function thrown(work: () => unknown): UpstreamFailure {
  try {
    work();
  } catch (error) {
    expect(error).toBeInstanceOf(UpstreamFailure);
    return error as UpstreamFailure;
  }
  throw new Error('expected a failure');
}

const ANSWER = {
  id: 'c',
  object: 'chat.completion',
  created: 1,
  model: 'm',
  choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }],
};

describe('jsonResult: errors inside a 200', () => {
  it('a body that is only an OpenRouter error is the HTTP failure its code names, not a malformed answer', () => {
    const failure = thrown(() => jsonResult('{"error":{"code":402,"message":"Insufficient credits"}}'));
    expect(failure).toMatchObject({ kind: 'http', status: 402, message: 'Insufficient credits' });
  });

  it('an answer with a top-level error and a choice finished as "error" is a failure too (502 without a usable code)', () => {
    const body = {
      ...ANSWER,
      choices: [{ index: 0, message: { role: 'assistant', content: 'half' }, finish_reason: 'error' }],
      error: { message: 'provider died' },
    };
    expect(thrown(() => jsonResult(JSON.stringify(body)))).toMatchObject({ kind: 'http', status: 502, message: 'provider died' });
    const named = { error: { code: 'rate_limit_exceeded', message: 'slow down' } };
    expect(thrown(() => jsonResult(JSON.stringify(named)))).toMatchObject({ kind: 'http', status: 502, upstreamCode: 'rate_limit_exceeded' });
  });

  it('an error given as a string is a 502 failure whose message is the string, answer or not', () => {
    expect(thrown(() => jsonResult('{"error":"provider overloaded"}'))).toMatchObject({ kind: 'http', status: 502, message: 'provider overloaded' });
    expect(thrown(() => jsonResult(JSON.stringify({ ...ANSWER, error: 'provider overloaded' })))).toMatchObject({ kind: 'http', status: 502 });
  });

  it('an ordinary answer is still an answer, and `"error": null` is no error', () => {
    expect(jsonResult(JSON.stringify(ANSWER)).completion.choices[0]?.message.content).toBe('hi');
    expect(jsonResult(JSON.stringify({ ...ANSWER, error: null })).completion.id).toBe('c');
  });
});

describe('eventFailure: SSE events that report an error', () => {
  it('reads the error event OpenRouter sends in a 200 stream', () => {
    const event = {
      id: 'g',
      object: 'chat.completion.chunk',
      error: { code: 429, message: 'Provider rate limited' },
      choices: [{ index: 0, delta: { content: '' }, finish_reason: 'error' }],
    };
    expect(errorEventFailure(JSON.stringify(event))).toMatchObject({ kind: 'http', status: 429, message: 'Provider rate limited' });
    expect(errorEventFailure(JSON.stringify({ error: { message: 'x' } }))).toMatchObject({ kind: 'http', status: 502 });
    expect(errorEventFailure(JSON.stringify({ choices: [{ index: 0, delta: {}, finish_reason: 'error' }] }))).toMatchObject({ kind: 'http', status: 502 });
    // An error given as a plain string (not OpenRouter's object) is a failure all the same.
    expect(errorEventFailure('{"error":"provider overloaded"}')).toMatchObject({ kind: 'http', status: 502, message: 'provider overloaded' });
  });

  it('carries the usage the error event reports, what the failed stream is charged', () => {
    const usage = { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13, cost: 0.000007777 };
    const choices = [{ index: 0, delta: { content: '' }, finish_reason: 'error' }];
    expect(errorEventFailure(JSON.stringify({ choices, error: { code: 502, message: 'x' }, usage }))?.usage).toEqual(usage);
    expect(errorEventFailure(JSON.stringify({ choices, usage }))?.usage).toEqual(usage);
    expect(errorEventFailure(JSON.stringify({ choices, error: { code: 502, message: 'x' } }))?.usage).toBeUndefined();
  });

  it('lets every other event through, including content that talks about errors', () => {
    for (const ok of [
      { choices: [{ index: 0, delta: { content: 'an "error" in the text' }, finish_reason: null }] },
      { choices: [{ index: 0, delta: { content: 'error' }, finish_reason: 'stop' }] },
      { choices: [], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 }, error: null },
    ]) {
      expect(errorEventFailure(JSON.stringify(ok))).toBeUndefined();
    }
  });
});

describe('describeUpstreamError', () => {
  it("flags OpenRouter's moderation refusal (metadata.reasons / flagged_input), and nothing else", () => {
    const moderation = {
      error: {
        code: 403,
        message: 'openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for "harassment". No credits were charged.',
        metadata: { reasons: ['harassment'], flagged_input: 'some text', provider_name: 'OpenAI', model_slug: 'openai/gpt-4o' },
      },
    };
    expect(describeUpstreamError(403, JSON.stringify(moderation))).toMatchObject({ code: '403', flagged: true });
    expect(describeUpstreamError(403, JSON.stringify({ error: { code: 403, message: 'Key disabled' } })).flagged).toBe(false);
    expect(describeUpstreamError(403, 'Forbidden').flagged).toBe(false);
  });
});

// An upstream, or a proxy before it, that echoes the Authorization it was sent: the gateway's key
// must not survive into a failure's text, whichever way the error came (see
// test/e2e/upstream-secret-echo.e2e-spec.ts for what the caller sees).
describe('upstream error text that echoes the gateway key', () => {
  const key = 'plain-upstream-key-4Fq9Zt';
  withholdUpstreamKey(key);
  const echo = `denied (authorization: Bearer ${key}; key: ${key}; other: sk-or-v1-0123456789abcdef)`;

  it('is masked in an HTTP error body, an error in a 200 (object or bare string) and an SSE error event', () => {
    const failures = [
      describeUpstreamError(400, JSON.stringify({ error: { message: echo, code: key, param: key } })),
      thrown(() => jsonResult(JSON.stringify({ error: { code: 400, message: echo } }))),
      thrown(() => jsonResult(JSON.stringify({ error: echo }))),
      errorEventFailure(JSON.stringify({ error: { code: 502, message: echo } })),
    ];
    for (const failure of failures) {
      expect(JSON.stringify({ ...failure, message: failure?.message })).not.toContain(key);
      expect(failure?.message).not.toContain('sk-or-v1');
      expect(failure?.message).toMatch(/^denied \(authorization: \[redacted\].*key: \[redacted\]; other: \[redacted\]\)$/);
    }
  });

  it('is masked before the message is cut, so no half key is left at the end', () => {
    const failure = describeUpstreamError(400, JSON.stringify({ error: { message: `${'x'.repeat(490)} ${key}` } }));
    expect(failure.message).not.toContain(key.slice(0, 9));
  });

  it('leaves a placeholder key (shorter than 8 characters) and the letters of a key inside a longer word alone', () => {
    // An upstream that needs no key still gets one: OPENROUTER_API_KEY=x, or none.
    withholdUpstreamKey('x');
    withholdUpstreamKey('none');
    const message = "This model's maximum context length is 8192 tokens; none of it was used";
    const failure = describeUpstreamError(400, JSON.stringify({ error: { message, code: 'context_length_exceeded', param: 'max_tokens' } }));
    expect(failure).toMatchObject({ message, code: 'context_length_exceeded', param: 'max_tokens' });
    const inWord = describeUpstreamError(400, JSON.stringify({ error: { message: `not${key}s but ${key}` } }));
    expect(inWord.message).toBe(`not${key}s but [redacted]`);
  });
});
