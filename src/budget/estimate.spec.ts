import { describe, expect, it } from 'vitest';
import { estimatePromptTokens, producedTokens, reservedCompletionTokens, TOKENS_PER_IMAGE } from './estimate.js';

describe('reservation estimates', () => {
  it('counts UTF-8 bytes / 3 plus framing, above what tokenizers produce for English and CJK', () => {
    const english = 'The quick brown fox jumps over the lazy dog. '.repeat(20); // ≈ 200 real tokens
    const cjk = '日本語のテキストです。'.repeat(20); // ≈ 1 token per character at most
    const en = estimatePromptTokens({ messages: [{ role: 'user', content: english }] });
    const ja = estimatePromptTokens({ messages: [{ role: 'user', content: cjk }] });
    expect(en).toBeGreaterThan(english.length / 4);
    expect(ja).toBeGreaterThanOrEqual(cjk.length);
  });

  it('counts every message, content parts, tools, and a flat amount per image instead of its URL', () => {
    const one = estimatePromptTokens({ messages: [{ role: 'user', content: 'hi' }] });
    const two = estimatePromptTokens({
      messages: [
        { role: 'system', content: 'hi' },
        { role: 'user', content: 'hi' },
      ],
    });
    expect(two).toBeGreaterThan(one);
    const withTools = estimatePromptTokens({
      messages: [{ role: 'user', content: 'hi' }],
      tools: [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object' } } }],
    });
    expect(withTools).toBeGreaterThan(one);
    const hugeImage = `data:image/png;base64,${'A'.repeat(3_000_000)}`;
    const image = estimatePromptTokens({
      messages: [
        {
          role: 'user',
          content: [
            { type: 'text', text: 'hi' },
            { type: 'image_url', image_url: { url: hugeImage } },
          ],
        },
      ],
    });
    expect(image).toBeGreaterThanOrEqual(TOKENS_PER_IMAGE);
    expect(image).toBeLessThan(TOKENS_PER_IMAGE + 100);
  });

  it('reserves the completion cap once per choice', () => {
    expect(reservedCompletionTokens({ messages: [] }, 256)).toBe(256);
    expect(reservedCompletionTokens({ messages: [], n: 3 }, 256)).toBe(768);
  });

  it('turns produced characters into tokens on the high side', () => {
    expect(producedTokens(0)).toBe(0);
    expect(producedTokens(10)).toBe(4);
  });
});
