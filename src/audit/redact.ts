import { type JsonValue, toJson } from './audit-event.js';

export const REDACTED = '[redacted]';

// Field names that hold credentials. Anchored at a word boundary so `max_tokens` or
// `tokens_per_minute` stay readable while `key`, `api_key`, `client_secret` or `token` do not.
const SECRET_NAME = /(^|[_\-.])(key|apikey|secret|password|passwd|passphrase|token|authorization|credentials?|cookie)$/i;
const SECRET_NAME_START = /^(api[_-]?key|access[_-]?token|refresh[_-]?token|bearer|private[_-]?key)/i;

// Values that look like credentials whatever field carries them: gateway keys (gh-…), OpenAI-style
// keys (sk-…), bearer headers, JWTs.
const SECRET_VALUE = /(\bgh-[A-Za-z0-9_-]{16,})|(\bsk-[A-Za-z0-9_-]{8,})|(\bbearer\s+\S+)|(\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})/gi;

export function isSecretName(name: string): boolean {
  return SECRET_NAME.test(name) || SECRET_NAME_START.test(name);
}

/** Masks credential-shaped substrings in free text (error messages, names, labels). */
export function redactText(value: string): string {
  return value.replace(SECRET_VALUE, REDACTED);
}

/**
 * The most a summary may take as JSON text. toJson cuts each string at 500 characters and each
 * level at 50 items, which still lets a 4 MiB body through almost whole (50 × 50 × 3 strings):
 * one such row was 3.78 MB, and ~70 of them buffered through an outage made one INSERT exceed
 * jsonb's 256 MB and fail on every retry. An admin change's body (names, budgets, limits, ids)
 * takes well under 1 KiB; 8 KiB still holds 16 strings at their 500-character cap.
 */
export const MAX_SUMMARY_BYTES = 8 * 1024;

/**
 * A bounded, redacted copy of a request body for the audit trail: secrets by field name and by
 * value shape, long strings cut, deep or wide structures truncated. Audit rows are read by
 * people reviewing security; a key in them would turn the trail into a leak. Over `maxBytes`,
 * only `{"[truncated]": true, "bytes": n}` is kept, n being the size the summary would have had:
 * the same for the same body, and an integer, which jsonb keeps exactly, so the hash-chained row
 * verifies as it was written.
 */
export function redactedSummary(value: unknown, maxBytes = MAX_SUMMARY_BYTES): JsonValue {
  const summary = toJson(redactValue(value, 0));
  const bytes = Buffer.byteLength(JSON.stringify(summary));
  return bytes <= maxBytes ? summary : { '[truncated]': true, bytes };
}

function redactValue(value: unknown, depth: number): unknown {
  if (typeof value === 'string') return redactText(value);
  if (typeof value !== 'object' || value === null || depth > 8) return value;
  if (Array.isArray(value)) return value.map((item: unknown) => redactValue(item, depth + 1));
  if (value instanceof Date) return value;
  const out: Record<string, unknown> = {};
  for (const [name, item] of Object.entries(value)) {
    out[name] = isSecretName(name) && item !== null && item !== undefined ? REDACTED : redactValue(item, depth + 1);
  }
  return out;
}
