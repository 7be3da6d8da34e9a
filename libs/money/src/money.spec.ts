import { describe, expect, it } from 'vitest';
import { formatUsd, parseUsd, tokensCost } from './money.js';

describe('money', () => {
  it.each([
    ['0.1', 100_000_000n],
    ['0.000123', 123_000n],
    ['1', 1_000_000_000n],
    [0.1, 100_000_000n],
    [1.5e-7, 150n],
    ['2e-7', 200n],
    ['0.0000000004', 0n],
    ['0.0000000005', 1n],
    ['-0.25', -250_000_000n],
    ['50', 50_000_000_000n],
  ])('parses %s exactly', (input, nanos) => {
    expect(parseUsd(input)).toBe(nanos);
  });

  it.each(['abc', '', '1.2.3', 'NaN'])('rejects %j', (input) => {
    expect(parseUsd(input)).toBeUndefined();
  });
  it('rejects non-finite numbers', () => {
    expect(parseUsd(Number.POSITIVE_INFINITY)).toBeUndefined();
  });

  it('formats without trailing zeros', () => {
    expect(formatUsd(123_000n)).toBe('0.000123');
    expect(formatUsd(5_000_000_000n)).toBe('5');
    expect(formatUsd(-1n)).toBe('-0.000000001');
  });

  it('sums that drift as floats stay exact', () => {
    let sum = 0n;
    for (let i = 0; i < 10; i++) sum += parseUsd('0.1') ?? 0n;
    expect(formatUsd(sum)).toBe('1');
  });

  it('prices tokens with sub-nano per-token prices', () => {
    expect(tokensCost(1000, '0.00000015')).toBe(150_000n);
    expect(tokensCost(3, 0.15e-6)).toBe(450n);
    expect(tokensCost(1, '0.00000000002')).toBe(0n);
    expect(tokensCost(100, '0.00000000002')).toBe(2n);
  });

  it('prices the same way when a price comes again (parsed once), and refuses a bad price every time', () => {
    for (let i = 0; i < 3; i++) {
      expect(tokensCost(1000, '0.00000015')).toBe(150_000n);
      expect(tokensCost(7, '0.00000015')).toBe(1050n);
      expect(() => tokensCost(1, 'free')).toThrow(RangeError);
    }
    // Past the bound the parsed prices are dropped, not the answers.
    for (let i = 1; i <= 1100; i++) expect(tokensCost(1000, formatUsd(BigInt(i)))).toBe(BigInt(i) * 1000n);
    expect(tokensCost(1000, '0.00000015')).toBe(150_000n);
  });
});
