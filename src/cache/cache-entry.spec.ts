import { describe, expect, it } from 'vitest';
import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';
import { decodeCacheEntry, encodeCacheEntry } from './cache-entry.js';

const completion: ChatCompletion = {
  id: 'c1',
  object: 'chat.completion',
  created: 1,
  model: 'openai/gpt-4o-mini',
  choices: [{ index: 0, message: { role: 'assistant', content: 'line one\nline two' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 },
};

describe('cache entries', () => {
  it('give back the body byte for byte, the model and the usage, whatever newlines the body holds', () => {
    const raw = `${JSON.stringify(completion, null, 2)}\n`;
    const answer = decodeCacheEntry(encodeCacheEntry(raw, completion));
    expect(answer?.raw).toBe(raw);
    expect(answer?.model).toBe('openai/gpt-4o-mini');
    expect(answer?.usage).toEqual({ prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 });
    expect(answer?.completion).toEqual(completion);
  });

  it('keeps an answer without usage (the hit is recorded without tokens)', () => {
    const { usage: _omitted, ...bare } = completion;
    const answer = decodeCacheEntry(encodeCacheEntry(JSON.stringify(bare), bare));
    expect(answer?.usage).toBeUndefined();
    expect(answer?.model).toBe('openai/gpt-4o-mini');
  });

  it('keeps the model the miss was recorded as, and reads entries written without it', () => {
    const raw = JSON.stringify(completion);
    expect(decodeCacheEntry(encodeCacheEntry(raw, completion, 'openai/gpt-4o-mini'))?.recordedModel).toBe('openai/gpt-4o-mini');
    const older = decodeCacheEntry(`["openai/gpt-4o-mini-2024-07-18",null]\n${raw}`);
    expect(older?.model).toBe('openai/gpt-4o-mini-2024-07-18');
    expect(older?.recordedModel).toBeUndefined();
  });

  it('refuses what is not an entry: the old format (a bare body), a broken header, an empty body', () => {
    expect(decodeCacheEntry(JSON.stringify(completion))).toBeUndefined();
    expect(decodeCacheEntry('{"not":"a header"}\n{}')).toBeUndefined();
    expect(decodeCacheEntry('["m", null\n{}')).toBeUndefined();
    expect(decodeCacheEntry('["m",null]\n')).toBeUndefined();
  });

  it('reads an answer however deeply the upstream nested it, and hands it out read-only', () => {
    const raw = `{"id":"c1","object":"chat.completion","created":1,"model":"m","extra":${'['.repeat(100_000)}${']'.repeat(100_000)},"choices":[{"index":0,"message":{"role":"assistant","content":"deep"},"finish_reason":"stop"}]}`;
    const answer = decodeCacheEntry(encodeCacheEntry(raw, JSON.parse(raw) as ChatCompletion));
    expect(answer?.completion.choices[0]?.message.content).toBe('deep');
    expect(Object.isFrozen(answer?.completion.choices[0]?.message)).toBe(true);
    expect(answer?.replay(false).join('')).toContain('"deep"');
  });
});
