import { describe, expect, it } from 'vitest';
import { formatUsd, MAX_NANOS, parseUsd, tokensCost, toUsdJson } from './money.js';

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

  it.each([
    ['1e2', 100_000_000_000n],
    ['0.5e-9', 1n],
    ['000000000000000000000000001', 1_000_000_000n],
    ['0.000000000000000000000000001e27', 1_000_000_000n],
    ['9223372036.854775807', MAX_NANOS],
    ['-9223372036.854775807', -MAX_NANOS],
    ['0e999999999', 0n],
    ['1e-999999999', 0n],
    ['-1e-999999999', 0n],
    [`1e-${'9'.repeat(400)}`, 0n],
  ])('parses %s within range', (input, nanos) => {
    expect(parseUsd(input)).toBe(nanos);
  });

  it.each(['1e999999999', '1e100000000', '-1e999999999', '9223372036.854775808', '9223372036.8547758075', '1e10', `1e${'9'.repeat(400)}`, 1e300])(
    'refuses %s: beyond what a bigint of nano-dollars holds',
    (input) => {
      expect(parseUsd(input)).toBeUndefined();
    },
  );

  it('bounds the exponent before writing out digits (no freeze on a huge one)', () => {
    const started = performance.now();
    for (let i = 0; i < 100; i++) {
      expect(parseUsd('1e100000000')).toBeUndefined();
      expect(parseUsd('1e-100000000')).toBe(0n);
    }
    expect(performance.now() - started).toBeLessThan(500);
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

  it('prices any plausible price exactly, and refuses a price with a huge exponent at once', () => {
    expect(tokensCost(2, '100000')).toBe(200_000_000_000_000n);
    const started = performance.now();
    expect(() => tokensCost(1, '1e999999999')).toThrow(RangeError);
    expect(() => tokensCost(1, 1e300)).toThrow(RangeError);
    expect(performance.now() - started).toBeLessThan(500);
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

describe('money in JSON responses', () => {
  it('is the exact plain decimal, never exponent notation nor float drift', () => {
    expect(
      JSON.stringify({ a: toUsdJson(1n), b: toUsdJson(123_456_789_123_456_789n), c: toUsdJson(0n), d: toUsdJson(-150n), e: toUsdJson(50_000_000_000n) }),
    ).toBe('{"a":0.000000001,"b":123456789.123456789,"c":0,"d":-0.00000015,"e":50}');
    expect(JSON.parse(JSON.stringify([toUsdJson(123_000n)]))).toEqual([0.000123]);
  });
});
