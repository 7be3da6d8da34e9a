import { describe, expect, it } from 'vitest';
import { median, percentileSorted, pool, ratio, signTestP, summarize } from './stats.js';

describe('percentileSorted (nearest rank)', () => {
  const ten = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

  it.each([
    [0, 1],
    [10, 1],
    [50, 5],
    [90, 9],
    [91, 10],
    [99, 10],
    [100, 10],
  ])('p%d of 1..10 is %d', (p, expected) => {
    expect(percentileSorted(ten, p)).toBe(expected);
  });

  it('takes the one sample for any percentile of a single sample', () => {
    expect(percentileSorted([7.5], 0)).toBe(7.5);
    expect(percentileSorted([7.5], 99)).toBe(7.5);
  });

  it('is NaN for no samples and refuses percentiles outside 0..100', () => {
    expect(percentileSorted([], 50)).toBeNaN();
    expect(() => percentileSorted(ten, 101)).toThrow(RangeError);
    expect(() => percentileSorted(ten, Number.NaN)).toThrow(RangeError);
  });
});

describe('summarize', () => {
  it('sorts a copy and reports count, mean, p50, p90, p99 and max', () => {
    const samples = [5, 1, 4, 2, 3];
    const s = summarize(samples);
    expect(s).toEqual({ count: 5, mean: 3, p50: 3, p90: 5, p99: 5, max: 5 });
    expect(samples).toEqual([5, 1, 4, 2, 3]);
  });

  it('p99 of 1000 samples is the 990th smallest', () => {
    const samples = Array.from({ length: 1000 }, (_, i) => 1000 - i);
    expect(summarize(samples).p99).toBe(990);
    expect(summarize(samples).p50).toBe(500);
  });

  it('reports NaN figures for an empty run instead of zeros', () => {
    const s = summarize([]);
    expect(s.count).toBe(0);
    expect(s.p50).toBeNaN();
    expect(s.mean).toBeNaN();
  });
});

describe('pool, ratio, median', () => {
  it('pools rounds so percentiles are taken over every sample', () => {
    const pooled = pool([[1, 2], [], [3]]);
    expect(Array.from(pooled)).toEqual([1, 2, 3]);
    expect(summarize(pool([[10, 10, 10], [1]])).p50).toBe(10);
  });

  it('ratio is NaN when a side is missing or zero', () => {
    expect(ratio(3, 2)).toBe(1.5);
    expect(ratio(undefined, 2)).toBeNaN();
    expect(ratio(3, 0)).toBeNaN();
  });

  it('median ignores NaN rounds', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([Number.NaN, 5])).toBe(5);
    expect(median([])).toBeNaN();
  });
});

describe('signTestP (two-sided exact sign test)', () => {
  it('gives the chance of a split at least this uneven from fair coin tosses', () => {
    expect(signTestP(6, 6)).toBeCloseTo(2 / 64, 12);
    expect(signTestP(0, 6)).toBeCloseTo(2 / 64, 12);
    expect(signTestP(5, 6)).toBeCloseTo((2 * 7) / 64, 12);
    expect(signTestP(1, 10)).toBeCloseTo((2 * 11) / 1024, 12);
  });

  it('is 1 for an even split, and for no decided round at all', () => {
    expect(signTestP(3, 6)).toBe(1);
    expect(signTestP(0, 0)).toBe(1);
  });

  it('refuses counts that cannot be a split', () => {
    expect(() => signTestP(4, 3)).toThrow(RangeError);
    expect(() => signTestP(-1, 3)).toThrow(RangeError);
    expect(() => signTestP(1.5, 3)).toThrow(RangeError);
  });
});
