import { hash } from 'node:crypto';
import { isoTime } from '../core/iso-time.js';
import { isUuid } from '../core/validate.js';

export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

/** One audit row as it is hashed and stored (seq, prev_hash and hash are added by the writer). */
export interface AuditEvent {
  readonly id: string;
  readonly at: Date;
  readonly actorUserId: string | null;
  readonly actorKeyId: string | null;
  readonly actorRole: string | null;
  readonly action: string;
  readonly targetType: string | null;
  readonly targetId: string | null;
  readonly requestId: string | null;
  readonly status: number | null;
  readonly details: JsonObject;
}

/** A stored row, as read back for queries and verification. */
export interface StoredAuditEvent extends AuditEvent {
  readonly seq: string;
  readonly prevHash: string;
  readonly hash: string;
}

/** The chain's anchor: the prev_hash of the very first event. */
export const GENESIS_HASH = '0'.repeat(64);

const MAX_TEXT = 200;
const MAX_STRING = 500;
const MAX_DEPTH = 6;
const MAX_ITEMS = 50;

/**
 * Makes any value safe to store as jsonb and to hash the same way before and after the round
 * trip: PostgreSQL rejects NUL and lone surrogates (one such event would wedge every retry of its
 * batch), bigint has no JSON form, and jsonb normalises nothing else that JSON.stringify emits.
 */
export function toJson(value: unknown, depth = 0): JsonValue {
  if (value === null || value === undefined) return null;
  switch (typeof value) {
    case 'string':
      return cleanString(value, MAX_STRING);
    case 'number':
      return Number.isFinite(value) ? value : null;
    case 'boolean':
      return value;
    case 'bigint':
      return value.toString();
    case 'object': {
      if (value instanceof Date) return Number.isNaN(value.getTime()) ? null : value.toISOString();
      if (depth >= MAX_DEPTH) return '[truncated]';
      if (Array.isArray(value)) {
        const items = value.slice(0, MAX_ITEMS).map((item: unknown) => toJson(item, depth + 1));
        if (value.length > MAX_ITEMS) items.push(`[${value.length - MAX_ITEMS} more]`);
        return items;
      }
      const out: JsonObject = {};
      let count = 0;
      for (const [key, item] of Object.entries(value)) {
        if (item === undefined || typeof item === 'function' || typeof item === 'symbol') continue;
        if (++count > MAX_ITEMS) {
          out['[truncated]'] = true;
          break;
        }
        out[cleanString(key, MAX_TEXT)] = toJson(item, depth + 1);
      }
      return out;
    }
    case 'undefined':
    case 'function':
    case 'symbol':
      return null;
  }
  return null;
}

// NUL (PostgreSQL text rejects it) and lone surrogates (jsonb rejects their \u escapes). Job records
// use the pair too. Global: for replace only (test() on it would carry lastIndex between calls).
// eslint-disable-next-line no-control-regex -- NUL is exactly what has to go
export const UNSTORABLE = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

// eslint-disable-next-line no-control-regex -- see UNSTORABLE
export const SUSPECT = /[\u0000\uD800-\uDFFF]/;

export function cleanString(value: string, max: number): string {
  // Nearly every string is plain: one cheap scan, and the replace only when something is there.
  const clean = SUSPECT.test(value) ? value.replace(UNSTORABLE, (c) => (c === '\u0000' ? '' : '\uFFFD')) : value;
  if (clean.length <= max) return clean;
  // Never cut a surrogate pair in half: that would bring back the lone surrogate removed above.
  const end = /[\uD800-\uDBFF]/.test(clean.charAt(max - 1)) ? max - 1 : max;
  return `${clean.slice(0, end)}…`;
}

/** For text columns: null stays null, anything else becomes a short clean string. */
export function textColumn(value: string | number | null | undefined): string | null {
  if (value === null || value === undefined || value === '') return null;
  return cleanString(String(value), MAX_TEXT);
}

/** uuid columns accept only uuids; anything else would fail the whole batch's INSERT. */
export function uuidColumn(value: unknown): string | null {
  return typeof value === 'string' && isUuid(value) ? value.toLowerCase() : null;
}

export function statusColumn(value: unknown): number | null {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= 999 ? value : null;
}

/**
 * JSON with object keys sorted at every level and no whitespace: one text per event, forever.
 * Stored rows are verified against this text, so it must never change; the spec holds it to
 * the original `map`/`join` version on varied inputs. Built by appending, without the arrays,
 * closures and per-key JSON.stringify calls of that version (3–7% of a request, BENCHMARKS.md).
 */
export function canonicalJson(value: JsonValue): string {
  switch (typeof value) {
    case 'string':
      return quote(value);
    case 'number':
      // What JSON.stringify writes for a number: its shortest round-trip text, or null.
      return Number.isFinite(value) ? `${value}` : 'null';
    case 'boolean':
      return value ? 'true' : 'false';
    case 'object':
      if (value === null) return 'null';
      return Array.isArray(value) ? canonicalArray(value) : canonicalObject(value);
    case 'undefined':
    case 'function':
    case 'symbol':
    case 'bigint':
      // Not JSON, but the original wrote what JSON.stringify makes of them (undefined, or a throw).
      return JSON.stringify(value);
  }
}

function canonicalArray(value: readonly JsonValue[]): string {
  let out = '[';
  for (let i = 0; i < value.length; i++) {
    if (i > 0) out += ',';
    // join() wrote nothing for holes and for items JSON has no text for.
    const item = canonicalJson(value[i]) as string | undefined;
    if (item !== undefined) out += item;
  }
  return `${out}]`;
}

function canonicalObject(value: { readonly [key: string]: JsonValue }): string {
  const keys = Object.keys(value);
  if (!isSorted(keys)) keys.sort();
  let out = '{';
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i];
    if (i > 0) out += ',';
    // A value without JSON text reads "undefined" here, exactly as the template string wrote it.
    out += `${quoteKey(key)}:${canonicalJson(value[key] ?? null)}`;
  }
  return `${out}}`;
}

/** Objects the gateway builds list their keys in order already; a check is cheaper than a sort. */
function isSorted(keys: readonly string[]): boolean {
  for (let i = 1; i < keys.length; i++) if (keys[i - 1] > keys[i]) return false;
  return true;
}

// Characters JSON.stringify escapes or rewrites (lone surrogates included): anything else is quoted as is.
// eslint-disable-next-line no-control-regex -- control characters are exactly what needs escaping
const NEEDS_ESCAPE = /["\\\u0000-\u001f\uD800-\uDFFF]/;

function quote(text: string): string {
  return NEEDS_ESCAPE.test(text) ? JSON.stringify(text) : `"${text}"`;
}

// Keys come from a small vocabulary (the audit's own field names), so their quoted text is kept.
const QUOTED_KEYS = new Map<string, string>();
const MAX_QUOTED_KEYS = 1024;

function quoteKey(key: string): string {
  let quoted = QUOTED_KEYS.get(key);
  if (quoted === undefined) {
    quoted = quote(key);
    if (QUOTED_KEYS.size < MAX_QUOTED_KEYS) QUOTED_KEYS.set(key, quoted);
  }
  return quoted;
}

/**
 * What the hash covers: every column except seq (the chain itself fixes the order). Written
 * out with the keys already in canonical order: the same text canonicalJson gives the object.
 */
export function canonicalEvent(event: AuditEvent): string {
  return (
    `{"action":${canonicalJson(event.action ?? null)}` +
    `,"actor_key_id":${canonicalJson(event.actorKeyId ?? null)}` +
    `,"actor_role":${canonicalJson(event.actorRole ?? null)}` +
    `,"actor_user_id":${canonicalJson(event.actorUserId ?? null)}` +
    `,"at":${canonicalJson(isoTime(event.at.getTime()))}` +
    `,"details":${canonicalJson(event.details ?? null)}` +
    `,"id":${canonicalJson(event.id ?? null)}` +
    `,"request_id":${canonicalJson(event.requestId ?? null)}` +
    `,"status":${canonicalJson(event.status ?? null)}` +
    `,"target_id":${canonicalJson(event.targetId ?? null)}` +
    `,"target_type":${canonicalJson(event.targetType ?? null)}}`
  );
}

export function chainHash(prevHash: string, event: AuditEvent): string {
  return linkHash(prevHash, canonicalEvent(event));
}

/** chainHash for an event whose canonical text the caller already has. */
export function linkHash(prevHash: string, canonical: string): string {
  return hash('sha256', prevHash + canonical, 'hex');
}
