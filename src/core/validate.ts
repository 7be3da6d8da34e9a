import { GatewayError } from './errors.js';

/**
 * Edge validation that names the offending field. Deliberately hand-written instead of
 * class-validator's whitelist mode: OpenAI bodies carry parameters we have never heard of and
 * must pass through, so we check only the fields the gateway itself reads.
 */
export type Body = Record<string, unknown>;

/** A request body: a JSON object, nested no deeper than MAX_NESTING (checked once, here). */
export function asBody(value: unknown): Body {
  const body = asObject(value, 'Request body', null);
  assertNesting(body);
  return body;
}

/** A field inside a body asBody already walked: its depth is checked, only its shape is left. */
export function asObject(value: unknown, what: string, param: string | null): Body {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new GatewayError('invalid_value', `${what} must be a JSON object.`, { param });
  }
  return value as Body;
}

/** Far deeper than any real request (a tool's JSON schema nests a few dozen levels at most). */
export const MAX_NESTING = 100;

/**
 * JSON.parse takes any depth, but the recursive code after it (JSON.stringify for the cache key
 * and the upstream body, the token estimate) overflows the stack a few thousand levels down:
 * refused here, naming the top-level field, instead of a 500 or a bogus upstream failure.
 * Iterative, so the check itself cannot overflow.
 */
function assertNesting(body: Body): void {
  for (const [field, root] of Object.entries(body)) {
    if (typeof root !== 'object' || root === null) continue;
    const stack: Array<[unknown, number]> = [[root, 2]];
    for (let entry = stack.pop(); entry !== undefined; entry = stack.pop()) {
      const [value, depth] = entry;
      if (depth > MAX_NESTING) throw new GatewayError('invalid_value', `'${field}' is nested more than ${MAX_NESTING} levels deep.`, { param: field });
      for (const child of Array.isArray(value) ? value : Object.values(value as object)) {
        if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
      }
    }
  }
}

function missing(param: string): GatewayError {
  return new GatewayError('missing_field', `Missing required parameter: '${param}'.`, { param });
}

function wrong(param: string, expected: string): GatewayError {
  return new GatewayError('invalid_value', `Invalid type for '${param}': expected ${expected}.`, { param });
}

// C0 and C1 controls, DEL included.
// eslint-disable-next-line no-control-regex
const CONTROL_CHARACTER = /[\u0001-\u001f\u007f-\u009f]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

export function requiredString(body: Body, param: string, maxLength = 200): string {
  const v = body[param];
  if (v === undefined || v === null) throw missing(param);
  if (typeof v !== 'string' || v.trim() === '') throw wrong(param, 'a non-empty string');
  if (v.length > maxLength) throw new GatewayError('invalid_value', `'${param}' is longer than ${maxLength} characters.`, { param });
  // PostgreSQL's text refuses U+0000: said here as a 400, not by the INSERT as a 500.
  if (v.includes('\u0000')) throw new GatewayError('invalid_value', `'${param}' must not contain a U+0000 (NUL) character.`, { param });
  // A name shown in listings, logs and audit rows: no control characters (a newline or an escape
  // sequence in a department name), and no unpaired surrogate, which the database would store as
  // U+FFFD (so a rename to one answered a misleading 409 against another name's U+FFFD).
  if (CONTROL_CHARACTER.test(v) || LONE_SURROGATE.test(v)) {
    throw new GatewayError('invalid_value', `'${param}' must not contain control characters or unpaired UTF-16 surrogates.`, { param });
  }
  return v.trim();
}

export function optionalString(body: Body, param: string, maxLength = 200): string | undefined {
  const v = body[param];
  if (v === undefined || v === null) return undefined;
  return requiredString(body, param, maxLength);
}

export function requiredEnum<T extends string>(body: Body, param: string, allowed: readonly T[]): T {
  const v = body[param];
  if (v === undefined || v === null) throw missing(param);
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) throw wrong(param, `one of ${allowed.join(', ')}`);
  return v as T;
}

export function optionalEnum<T extends string>(body: Body, param: string, allowed: readonly T[]): T | undefined {
  const v = body[param];
  return v === undefined || v === null ? undefined : requiredEnum(body, param, allowed);
}

export function optionalNumber(body: Body, param: string, opts: { min?: number; max?: number; integer?: boolean } = {}): number | undefined {
  const v = body[param];
  if (v === undefined || v === null) return undefined;
  return requiredNumber(body, param, opts);
}

export function requiredNumber(body: Body, param: string, opts: { min?: number; max?: number; integer?: boolean } = {}): number {
  const v = body[param];
  if (v === undefined || v === null) throw missing(param);
  const expected = opts.integer ? 'an integer' : 'a number';
  if (typeof v !== 'number' || !Number.isFinite(v) || (opts.integer && !Number.isInteger(v))) throw wrong(param, expected);
  if (opts.min !== undefined && v < opts.min) throw new GatewayError('invalid_value', `'${param}' must be at least ${opts.min}.`, { param });
  if (opts.max !== undefined && v > opts.max) throw new GatewayError('invalid_value', `'${param}' must be at most ${opts.max}.`, { param });
  return v;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function isUuid(value: string): boolean {
  return UUID.test(value);
}

export function requiredUuid(body: Body, param: string): string {
  const v = requiredString(body, param, 64);
  if (!isUuid(v)) throw wrong(param, 'a UUID');
  return v.toLowerCase();
}

/** For ids in URL paths: a malformed id is simply not found (and never reaches SQL as a bad uuid). */
export function pathUuid(value: string, what: string): string {
  if (!isUuid(value)) throw new GatewayError('not_found', `No ${what} with id '${value.slice(0, 64)}'.`);
  return value.toLowerCase();
}

/** For ids in a query string (a filter): a malformed one is the caller's 400, naming the parameter. */
export function queryUuid(value: string | undefined, param: string): string | undefined {
  if (value === undefined || value === '') return undefined;
  if (typeof value !== 'string' || !isUuid(value)) throw new GatewayError('invalid_value', `Invalid '${param}': expected a UUID.`, { param });
  return value.toLowerCase();
}

/** Refuses any body field not in `allowed`, naming it (an admin typo must not be silently ignored). */
export function rejectUnknownFields(body: Body, allowed: readonly string[]): void {
  for (const key of Object.keys(body)) {
    if (!allowed.includes(key)) {
      throw new GatewayError('invalid_value', `Unknown field '${key.slice(0, 64)}': this endpoint takes ${allowed.map((a) => `'${a}'`).join(', ')}.`, {
        param: key.slice(0, 64),
      });
    }
  }
}

/**
 * Refuses any query parameter not in `allowed`, naming it: a misspelt filter must not be ignored
 * and answered with everything. `usage` says what the route takes instead.
 */
export function rejectUnknownQuery(query: unknown, allowed: readonly string[], usage?: string): void {
  if (typeof query !== 'object' || query === null) return;
  for (const param of Object.keys(query)) {
    if (allowed.includes(param)) continue;
    const takes = allowed.length === 0 ? 'this endpoint takes none' : `this endpoint takes ${allowed.map((a) => `'${a}'`).join(', ')}`;
    throw new GatewayError('invalid_value', `Unknown query parameter '${param.slice(0, 64)}': ${usage ?? takes}.`, { param: param.slice(0, 64) });
  }
}

// "2026-01-31", or "2026-01-31T09:30[:00[.123]]" with "Z" or "±hh:mm" (a zone-less time would be
// read in the server's local time). Letters case-insensitive, as RFC 3339 allows.
const ISO_DATE = /^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2}))?$/i;
// 0001-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z: what PostgreSQL's timestamptz takes as
// text from toISOString (it has no year 0, and toISOString writes years past 9999 as "+010000").
const MIN_TIME = -62_135_596_800_000;
const MAX_TIME = 253_402_300_799_999;

function daysInMonth(year: number, month: number): number {
  if (month === 2) return (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0 ? 29 : 28;
  return [4, 6, 9, 11].includes(month) ? 30 : 31;
}

/**
 * Strict ISO-8601: a date (UTC midnight) or a date-time with Z or an offset, years 0001-9999, every
 * field in its range (no Feb 30). Undefined otherwise: Date.parse takes "1" (2001), "December 31
 * 2030", zone-less local times and years PostgreSQL refuses.
 */
export function parseIsoDate(text: string): Date | undefined {
  const m = ISO_DATE.exec(text);
  if (!m) return undefined;
  const [year, month, day, hour, minute, second] = [m[1], m[2], m[3], m[4], m[5], m[6]].map((v) => (v === undefined ? 0 : Number(v))) as [
    number,
    number,
    number,
    number,
    number,
    number,
  ];
  if (year < 1 || month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month) || hour > 23 || minute > 59 || second > 59) return undefined;
  let offsetMinutes = 0;
  const zone = m[8];
  if (zone !== undefined && zone.toUpperCase() !== 'Z') {
    const hours = Number(zone.slice(1, 3));
    const minutes = Number(zone.slice(4, 6));
    if (hours > 23 || minutes > 59) return undefined;
    offsetMinutes = (zone.startsWith('-') ? -1 : 1) * (hours * 60 + minutes);
  }
  const millis = Number((m[7] ?? '').padEnd(3, '0').slice(0, 3));
  // setUTCFullYear, not Date.UTC: Date.UTC reads years 0-99 as 1900-1999.
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, second, millis);
  const time = date.getTime() - offsetMinutes * 60_000;
  return time >= MIN_TIME && time <= MAX_TIME ? new Date(time) : undefined;
}

function invalidDate(param: string, value: unknown): GatewayError {
  // In a query string an unencoded '+' arrives as a space: say how to write it.
  const plus = typeof value === 'string' && / \d{2}:\d{2}$/.test(value) ? " (in a query string, write the offset's '+' as %2B)" : '';
  return new GatewayError(
    'invalid_value',
    `Invalid '${param}': expected an ISO-8601 date (2026-01-31) or date-time with Z or an offset (2026-01-31T09:30:00Z, 2026-01-31T09:30:00+02:00), years 0001-9999${plus}.`,
    { param },
  );
}

export function optionalDate(body: Body, param: string): Date | undefined {
  const v = body[param];
  if (v === undefined || v === null) return undefined;
  const date = typeof v === 'string' ? parseIsoDate(v.trim()) : undefined;
  if (date === undefined) throw invalidDate(param, v);
  return date;
}

export function queryDate(value: string | undefined, param: string): Date | undefined {
  if (value === undefined || value === '') return undefined;
  const date = typeof value === 'string' ? parseIsoDate(value) : undefined;
  if (date === undefined) throw invalidDate(param, value);
  return date;
}
