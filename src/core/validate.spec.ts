import { describe, expect, it } from 'vitest';
import { GatewayError } from './errors.js';
import { optionalDate, parseIsoDate, queryDate, rejectUnknownFields, requiredString } from './validate.js';

function errorOf(fn: () => unknown): GatewayError {
  try {
    fn();
  } catch (error) {
    if (error instanceof GatewayError) return error;
    throw error;
  }
  throw new Error('expected a GatewayError');
}

describe('ISO-8601 dates (query and body)', () => {
  it.each([
    ['2026-01-31', '2026-01-31T00:00:00.000Z'],
    ['2026-01-31T09:30:00Z', '2026-01-31T09:30:00.000Z'],
    ['2026-01-31T09:30Z', '2026-01-31T09:30:00.000Z'],
    ['2026-01-31T09:30:00.123456Z', '2026-01-31T09:30:00.123Z'],
    ['2026-01-31T09:30:00.5Z', '2026-01-31T09:30:00.500Z'],
    ['2026-01-31T09:30:00+02:00', '2026-01-31T07:30:00.000Z'],
    ['2026-01-31T09:30:00-05:30', '2026-01-31T15:00:00.000Z'],
    ['2026-01-31t09:30:00z', '2026-01-31T09:30:00.000Z'],
    ['2024-02-29', '2024-02-29T00:00:00.000Z'],
    ['0001-01-01', '0001-01-01T00:00:00.000Z'],
    ['0050-06-01', '0050-06-01T00:00:00.000Z'],
    ['9999-12-31T23:59:59.999Z', '9999-12-31T23:59:59.999Z'],
    [new Date(1_780_000_000_123).toISOString(), new Date(1_780_000_000_123).toISOString()],
  ])('%s is %s', (text, iso) => {
    expect(parseIsoDate(text)?.toISOString()).toBe(iso);
    expect(queryDate(text, 'from')?.toISOString()).toBe(iso);
    expect(optionalDate({ expires_at: text }, 'expires_at')?.toISOString()).toBe(iso);
  });

  it.each([
    '1', // Date.parse: 2001-01-01
    '2026', // a bare year
    'December 31 2030',
    'Tue, 01 Dec 2026 00:00:00 GMT',
    '2026-01-31T09:30:00', // zone-less: would be the server's local time
    '2026-01-31 09:30:00Z',
    '2026-01-31T09:30:00 02:00', // '+' decoded to a space
    '10000-01-01',
    '+275760-09-13T00:00:00Z',
    '-271821-04-20T00:00:00Z',
    '+002026-01-01T00:00:00Z',
    '0000-01-01',
    '0001-01-01T00:00:00+01:00', // year 0 in UTC
    '9999-12-31T23:59:59-00:01', // year 10000 in UTC
    '2026-02-29',
    '2026-04-31',
    '2026-13-01',
    '2026-00-10',
    '2026-01-00',
    '2026-01-31T24:00:00Z',
    '2026-01-31T23:60:00Z',
    '2026-01-31T23:59:60Z',
    '2026-01-31T09:30:00+24:00',
    '2026-01-31T09:30:00.Z',
    '',
    'yesterday',
  ])('%j is refused, naming the parameter', (text) => {
    expect(parseIsoDate(text)).toBeUndefined();
    if (text !== '') expect(errorOf(() => queryDate(text, 'from'))).toMatchObject({ code: 'invalid_value', param: 'from' });
    expect(errorOf(() => optionalDate({ expires_at: text }, 'expires_at'))).toMatchObject({ code: 'invalid_value', param: 'expires_at' });
  });

  it('refuses a date that is no string', () => {
    expect(errorOf(() => optionalDate({ expires_at: 1_780_000_000_000 }, 'expires_at'))).toMatchObject({ code: 'invalid_value', param: 'expires_at' });
    expect(errorOf(() => queryDate(['2026-01-01', '2026-01-02'] as unknown as string, 'to'))).toMatchObject({ param: 'to' });
  });

  it("explains the query string's '+'", () => {
    expect(errorOf(() => queryDate('2026-01-31T09:30:00 02:00', 'to')).message).toContain('%2B');
  });

  it('absent stays absent', () => {
    expect(queryDate(undefined, 'from')).toBeUndefined();
    expect(queryDate('', 'from')).toBeUndefined();
    expect(optionalDate({}, 'expires_at')).toBeUndefined();
    expect(optionalDate({ expires_at: null }, 'expires_at')).toBeUndefined();
  });
});

describe('unknown body fields', () => {
  it('are refused, naming the field', () => {
    const error = errorOf(() => rejectUnknownFields({ requests_per_minute: 1, tokens_per_min: 2 }, ['requests_per_minute', 'tokens_per_minute']));
    expect(error).toMatchObject({ code: 'invalid_value', param: 'tokens_per_min' });
    expect(error.message).toContain("Unknown field 'tokens_per_min'");
  });
  it('known ones pass', () => {
    expect(() => rejectUnknownFields({ a: 1 }, ['a', 'b'])).not.toThrow();
  });
});

describe('names (requiredString)', () => {
  it('keeps ordinary text, other scripts and emoji, trimmed', () => {
    expect(requiredString({ name: '  Research & Development ' }, 'name')).toBe('Research & Development');
    expect(requiredString({ name: 'Forschung – Ünïcödé 研究 🧪' }, 'name')).toBe('Forschung – Ünïcödé 研究 🧪');
  });

  it.each([
    ['a newline', 'Sales\nAdmin'],
    ['an escape sequence', 'Sales\u001b[31m'],
    ['DEL', 'Sales\u007f'],
    ['a C1 control', 'Sales\u009b'],
    ['an unpaired surrogate', 'Sales\ud800'],
  ])('refuses %s with a 400 naming the field', (_what, name) => {
    expect(() => requiredString({ name }, 'name')).toThrow(expect.objectContaining({ code: 'invalid_value', param: 'name' }));
  });
});
