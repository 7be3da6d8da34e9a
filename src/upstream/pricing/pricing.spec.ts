import { describe, expect, it } from 'vitest';
import type { Usage } from '../../../libs/openai-contract/src/index.js';
import { costOf } from './pricing.js';

const PRICE = { prompt: '0.00000015', completion: '0.0000006' };

describe('costOf', () => {
  it('prices tokens at the table price when the upstream reports no cost', () => {
    expect(costOf({ prompt_tokens: 1000, completion_tokens: 100, total_tokens: 1100 }, PRICE)).toEqual({ nanos: 210_000n, source: 'pricing_table' });
  });

  it('takes the cost the upstream reported', () => {
    expect(costOf({ prompt_tokens: 1000, completion_tokens: 100, total_tokens: 1100, cost: 0.001 }, PRICE)).toEqual({ nanos: 1_000_000n, source: 'upstream' });
  });

  // readUsage never hands these out; a Usage built by hand must still not throw in a settle
  // (BigInt of a fraction) nor produce a negative cost the ledger's CHECK refuses.
  it('neither throws on a fractional count nor charges a negative one', () => {
    const usage = (prompt: number, completion: number): Usage => ({ prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion });
    expect(costOf(usage(999.5, 100), PRICE)).toEqual({ nanos: 210_000n, source: 'pricing_table' });
    expect(costOf(usage(-1000, 100), PRICE)).toEqual({ nanos: 60_000n, source: 'pricing_table' });
    expect(costOf(usage(Number.NaN, 100), PRICE).nanos).toBe(60_000n);
  });
});
