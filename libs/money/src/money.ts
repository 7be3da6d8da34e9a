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

/**
 * Parses a decimal USD amount ("0.000123", 1.5, "2e-7") to nano-dollars, rounding half away
 * from zero to the nearest nano-dollar. Works on the decimal text, never via float arithmetic,
 * so "0.1" is exactly 100_000_000n. Returns undefined for anything that is not a finite number.
 */
export function parseUsd(value: string | number): Nanos | undefined {
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
  const exponent = m[4] ? Number(m[4]) : 0;
  let digits = m[2] + (m[3] ?? '');
  // Position of the decimal point within `digits`, moved by the exponent, then by 9 for nanos.
  let point = m[2].length + exponent + 9;
  if (point < 0) {
    digits = '0'.repeat(-point) + digits;
    point = 0;
  }
  if (point > digits.length) digits = digits + '0'.repeat(point - digits.length);
  const whole = digits.slice(0, point) || '0';
  const rest = digits.slice(point);
  let nanos = BigInt(whole);
  if (rest.length > 0 && rest.charCodeAt(0) >= 53 /* '5' */) nanos += 1n;
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

/** A per-token price as nanos per million tokens: sub-nano per-token prices stay exact (0.15e-6 USD/token = 150). */
function perMillionNanos(pricePerTokenUsd: string | number): Nanos {
  if (typeof pricePerTokenUsd === 'string') {
    const known = PARSED_PRICES.get(pricePerTokenUsd);
    if (known !== undefined) return known;
  }
  const perMillion = parseUsd(typeof pricePerTokenUsd === 'number' ? pricePerTokenUsd * 1e6 : scaleDecimal(pricePerTokenUsd, 6));
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
