import { describe, expect, it } from 'vitest';
import { GatewayError } from '../../../core/errors.js';
import { plainDecimal, PutPriceDto } from './pricing-admin.dto.js';

describe('admin price input: bounds', () => {
  it.each([
    ['1e3', '1000'],
    ['1000', '1000'],
    ['1000.000', '1000'],
    ['999.999999999', '999.999999999'],
    ['0.0000000000000000000000000001', '0.0000000000000000000000000001'],
    ['1e-28', '0.0000000000000000000000000001'],
    ['0.00015e-3', '0.00000015'],
    ['000.0000e99999999999', '0'],
  ])('%j is the exact decimal %s', (input, expected) => {
    expect(plainDecimal(input)).toBe(expected);
  });

  it.each(['1e999999999', '1e100000000', '1e-999999999', '1e-30', '1000.000000001', '1001', '10000', 1e300, 5e-324])('%j is refused', (input) => {
    expect(plainDecimal(input)).toBeUndefined();
  });

  it('refuses a huge exponent without writing its digits out', () => {
    const started = performance.now();
    for (let i = 0; i < 100; i++) expect(plainDecimal('1e-100000000')).toBeUndefined();
    expect(performance.now() - started).toBeLessThan(500);
  });

  it('refuses an unknown field, naming it', () => {
    expect(() => PutPriceDto.parse({ prompt: '0.1', completion: '0.1', completions: '0.2' })).toThrow(GatewayError);
    try {
      PutPriceDto.parse({ prompt: '0.1', completion: '0.1', completions: '0.2' });
    } catch (error) {
      expect(error).toMatchObject({ code: 'invalid_value', param: 'completions' });
    }
  });
});
