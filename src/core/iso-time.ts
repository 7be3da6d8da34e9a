let cachedSecond = Number.NaN;
let cachedPrefix = '';

/**
 * `new Date(ms).toISOString()`, with the text up to the second kept from the previous call: a
 * request writes three of these (its log line, its audit event, its ledger row), and the Date and
 * its formatting cost ~1 µs each against ~0.1 µs for a cached prefix and three digits. Anything
 * but a whole, non-negative number of milliseconds takes the Date's own path, errors included
 * (an invalid time throws RangeError exactly as toISOString does).
 */
export function isoTime(ms: number): string {
  const millis = ms % 1000;
  if (!(millis >= 0) || !Number.isInteger(ms)) return new Date(ms).toISOString();
  const second = ms - millis;
  if (second !== cachedSecond) {
    // "2026-12-01T01:24:54.000Z" without "000Z"; a five- or six-digit year keeps its own form.
    cachedPrefix = new Date(second).toISOString().slice(0, -4);
    cachedSecond = second;
  }
  return `${cachedPrefix}${millis < 10 ? '00' : millis < 100 ? '0' : ''}${millis}Z`;
}
