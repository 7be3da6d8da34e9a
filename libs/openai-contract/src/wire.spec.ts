import { describe, expect, it } from 'vitest';
import { readTokenCount, readUsage } from './wire.js';

describe('readUsage', () => {
  it('reads the counts and the cost the upstream reported', () => {
    expect(readUsage({ usage: { prompt_tokens: 10, completion_tokens: 3, total_tokens: 13, cost: '0.000002' } })).toEqual({
      prompt_tokens: 10,
      completion_tokens: 3,
      total_tokens: 13,
      cost: '0.000002',
    });
  });

  it('keeps a cost sent as decimal text as sent (priced exactly later), and drops one that is no amount', () => {
    const costOf = (cost: unknown) => readUsage({ usage: { prompt_tokens: 10, completion_tokens: 3, cost } })?.cost;
    expect(costOf('0.000001234')).toBe('0.000001234');
    expect(costOf('2e-7')).toBe('2e-7');
    expect(costOf(0.5)).toBe(0.5);
    // Number() reads '' and '  ' as 0 (a free call) and '0x1F' as 31: the price table decides instead.
    for (const cost of ['', '  ', '0x1F', '0b1', 'NaN', 'Infinity', '1,5', '$0.01', null, true, {}]) expect(costOf(cost)).toBeUndefined();
  });

  it('rounds a fractional count to a whole one (money is computed with BigInt, which refuses fractions)', () => {
    expect(readUsage({ usage: { prompt_tokens: 10.5, completion_tokens: 2.4, total_tokens: 12.9 } })).toEqual({
      prompt_tokens: 11,
      completion_tokens: 2,
      total_tokens: 13,
    });
  });

  it.each([
    ['negative', -1000],
    ['infinite (1e400 parses as Infinity)', JSON.parse('1e400') as number],
    ['NaN', Number.NaN],
    ['a string', '12'],
    ['missing', undefined],
  ])('takes a usage whose prompt count is %s for none at all', (_, prompt) => {
    expect(readUsage({ usage: { prompt_tokens: prompt, completion_tokens: 3 } })).toBeUndefined();
    expect(readUsage({ usage: { prompt_tokens: 3, completion_tokens: prompt } })).toBeUndefined();
  });

  it('sums prompt and completion when the total is unusable', () => {
    expect(readUsage({ usage: { prompt_tokens: 4, completion_tokens: 5, total_tokens: -1 } })?.total_tokens).toBe(9);
    expect(readUsage({ usage: { prompt_tokens: 4, completion_tokens: 5 } })?.total_tokens).toBe(9);
  });

  it('reads no usage from what has none', () => {
    expect(readUsage(undefined)).toBeUndefined();
    expect(readUsage({ usage: null })).toBeUndefined();
    expect(readUsage({ usage: [1, 2] })).toBeUndefined();
  });
});

describe('readTokenCount', () => {
  it('gives whole, non-negative counts or nothing', () => {
    expect(readTokenCount(0)).toBe(0);
    expect(readTokenCount(7.5)).toBe(8);
    expect(readTokenCount(-0.2)).toBeUndefined();
    expect(readTokenCount(Number.POSITIVE_INFINITY)).toBeUndefined();
    expect(readTokenCount(null)).toBeUndefined();
  });
});
