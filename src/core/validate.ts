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

export function requiredString(body: Body, param: string, maxLength = 200): string {
  const v = body[param];
  if (v === undefined || v === null) throw missing(param);
  if (typeof v !== 'string' || v.trim() === '') throw wrong(param, 'a non-empty string');
  if (v.length > maxLength) throw new GatewayError('invalid_value', `'${param}' is longer than ${maxLength} characters.`, { param });
  // PostgreSQL's text refuses U+0000: said here as a 400, not by the INSERT as a 500.
  if (v.includes('\u0000')) throw new GatewayError('invalid_value', `'${param}' must not contain a U+0000 (NUL) character.`, { param });
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

export function optionalDate(body: Body, param: string): Date | undefined {
  const v = body[param];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || Number.isNaN(Date.parse(v))) throw wrong(param, 'an ISO-8601 date-time');
  return new Date(v);
}

export function queryDate(value: string | undefined, param: string): Date | undefined {
  if (value === undefined || value === '') return undefined;
  if (Number.isNaN(Date.parse(value))) throw new GatewayError('invalid_value', `Invalid '${param}': expected an ISO-8601 date-time.`, { param });
  return new Date(value);
}
