/**
 * Money as integer nano-dollars (1e-9 USD) in a `bigint`.
 *
 * Why nano: one cheap call (a few hundred tokens of a small model) costs well under a
 * micro-dollar, so micro-dollars would round whole requests to zero. Why bigint: sums over a
 * month of traffic must be exact; floats drift, and Postgres `bigint` columns round-trip as
 * strings that `BigInt()` reads without loss.
 */
export type Nanos = bigint;

export const NANOS_PER_USD = 1_000_000_000n;
export const ZERO: Nanos = 0n;

const DECIMAL = /^(-)?(\d+)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;

/** The largest amount a PostgreSQL `bigint` of nano-dollars holds (~9.2e9 USD). */
export const MAX_NANOS: Nanos = 9_223_372_036_854_775_807n;
// Digits of MAX_NANOS: a whole part with more is out of range, whatever its exponent says.
const MAX_NANOS_DIGITS = 19;

/**
 * Parses a decimal USD amount ("0.000123", 1.5, "2e-7") to nano-dollars, rounding half away
 * from zero to the nearest nano-dollar. Works on the decimal text, never via float arithmetic,
 * so "0.1" is exactly 100_000_000n. Returns undefined for anything that is not a finite number,
 * and for amounts beyond ±MAX_NANOS: an exponent is bounded before any digit is written out,
 * so "1e999999999" (from an admin or an upstream's usage.cost) costs no more than "1".
 */
export function parseUsd(value: string | number): Nanos | undefined {
  const nanos = decimalNanos(value, MAX_NANOS_DIGITS);
  return nanos === undefined || nanos > MAX_NANOS || nanos < -MAX_NANOS ? undefined : nanos;
}

/** parseUsd's work, refusing a whole part of more than `maxDigits` nano-dollar digits (before writing any out). */
function decimalNanos(value: string | number, maxDigits: number): Nanos | undefined {
  let text: string;
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) return undefined;
    // Number#toString gives the shortest text that round-trips, e.g. 1.5e-7; the regex takes exponents.
    text = value.toString();
  } else {
    text = value.trim();
  }
  const m = DECIMAL.exec(text);
  if (!m) return undefined;
  const negative = m[1] === '-';
  // Leading zeros say nothing; without them the point's position bounds the magnitude.
  const all = m[2] + (m[3] ?? '');
  const digits = all.replace(/^0+/, '');
  if (digits === '') return 0n;
  // Position of the decimal point within `digits`, moved by the exponent (a long one is ±Infinity), then by 9 for nanos.
  const point = m[2].length - (all.length - digits.length) + (m[4] ? Number(m[4]) : 0) + 9;
  if (point > maxDigits) return undefined;
  // Below a tenth of a nano-dollar: rounds to zero.
  if (point < 0) return 0n;
  const whole = point > digits.length ? digits + '0'.repeat(point - digits.length) : digits.slice(0, point) || '0';
  let nanos = BigInt(whole);
  if (point < digits.length && digits.charCodeAt(point) >= 53 /* '5' */) nanos += 1n;
  return negative ? -nanos : nanos;
}

/** Renders nano-dollars as a decimal USD string without trailing zeros ("0.000123", "5"). */
export function formatUsd(nanos: Nanos): string {
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const whole = abs / NANOS_PER_USD;
  const frac = (abs % NANOS_PER_USD).toString().padStart(9, '0').replace(/0+$/, '');
  return (negative ? '-' : '') + whole.toString() + (frac ? '.' + frac : '');
}

/** The JSON number for an API response. Exact for any amount below ~9e6 USD (2^53 nanos). */
export function toUsdNumber(nanos: Nanos): number {
  return Number(formatUsd(nanos));
}

/**
 * A USD amount for a JSON response, written as the exact plain decimal ("0.000000001", never
 * "1e-9"; "123456789.123456789", not the nearest double): JSON.stringify writes a JSON.rawJSON
 * value's text verbatim (Node ≥ 21), and it parses as the same number toUsdNumber would give
 * wherever that one is exact. For reports and views only: building it costs more than a number.
 */
export interface UsdJson {
  readonly rawJSON: string;
}

// Node's JSON has rawJSON; TypeScript's es2023 lib does not declare it yet.
const json = JSON as unknown as { rawJSON(text: string): UsdJson };

export function toUsdJson(nanos: Nanos): UsdJson {
  return json.rawJSON(formatUsd(nanos));
}

/** Cost of `tokens` at a per-token price given in nano-dollars with fractional part (price may be < 1 nano). */
export function tokensCost(tokens: number, pricePerTokenUsd: string | number): Nanos {
  const total = perMillionNanos(pricePerTokenUsd) * BigInt(tokens);
  // Round half up to the nearest nano.
  return (total + 500_000n) / 1_000_000n;
}

/**
 * Prices parsed once: every request prices its reservation and its settle (four calls), and the
 * prices are the few strings of the pricing table. Bounded anyway, since admins can set prices.
 */
const PARSED_PRICES = new Map<string, Nanos>();
const PARSED_PRICES_MAX = 1024;
// Nano-dollars per million tokens: far above any price (1e30 USD per token), far below a stall.
const MAX_PRICE_DIGITS = 60;

/** A per-token price as nanos per million tokens: sub-nano per-token prices stay exact (0.15e-6 USD/token = 150). */
function perMillionNanos(pricePerTokenUsd: string | number): Nanos {
  if (typeof pricePerTokenUsd === 'string') {
    const known = PARSED_PRICES.get(pricePerTokenUsd);
    if (known !== undefined) return known;
  }
  // Not parseUsd's range: a price per million tokens may exceed what one charge may be; bounded
  // all the same, so a price with a huge exponent cannot stall a request.
  const perMillion = decimalNanos(typeof pricePerTokenUsd === 'number' ? pricePerTokenUsd * 1e6 : scaleDecimal(pricePerTokenUsd, 6), MAX_PRICE_DIGITS);
  if (perMillion === undefined) throw new RangeError(`invalid price ${String(pricePerTokenUsd)}`);
  if (typeof pricePerTokenUsd === 'string') {
    if (PARSED_PRICES.size >= PARSED_PRICES_MAX) PARSED_PRICES.clear();
    PARSED_PRICES.set(pricePerTokenUsd, perMillion);
  }
  return perMillion;
}

function scaleDecimal(text: string, exp: number): string {
  return `${text.trim()}e${exp}`;
}

export function maxNanos(a: Nanos, b: Nanos): Nanos {
  return a > b ? a : b;
}
