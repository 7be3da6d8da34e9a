import { describe, expect, it } from 'vitest';
import { isoTime } from './iso-time.js';

describe('isoTime', () => {
  it('writes what Date.prototype.toISOString writes, across seconds, days and years', () => {
    const instants = [
      0,
      1,
      9,
      10,
      99,
      100,
      999,
      1000,
      Date.parse('2026-12-01T01:24:54.350Z'),
      Date.parse('2026-12-01T01:24:54.351Z'),
      Date.parse('2026-12-01T01:24:55.007Z'),
      Date.parse('2026-12-31T23:59:59.999Z'),
      Date.parse('2027-01-01T00:00:00.000Z'),
      Date.parse('2028-02-29T12:00:00.040Z'),
      // Past year 9999 toISOString switches to a signed six-digit year.
      Date.parse('+010000-01-01T00:00:00.123Z'),
    ];
    // Twice, in order and back, so that every instant is formatted with and without a cached prefix.
    for (const ms of [...instants, ...instants.toReversed()]) expect(isoTime(ms)).toBe(new Date(ms).toISOString());
    for (let ms = 1_796_000_000_000; ms < 1_796_000_003_000; ms += 7) expect(isoTime(ms)).toBe(new Date(ms).toISOString());
  });

  it('takes the Date path for times before 1970, fractions and invalid times', () => {
    expect(isoTime(-1)).toBe('1969-12-31T23:59:59.999Z');
    expect(isoTime(-1500)).toBe(new Date(-1500).toISOString());
    expect(isoTime(1000.7)).toBe('1970-01-01T00:00:01.000Z');
    expect(() => isoTime(Number.NaN)).toThrow(RangeError);
    expect(() => isoTime(Number.POSITIVE_INFINITY)).toThrow(RangeError);
  });
});
