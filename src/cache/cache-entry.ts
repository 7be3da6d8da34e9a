import { type ChatCompletion, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';

/**
 * A stored answer: one header line with what every hit needs (the model that answered and its
 * usage, for the response headers and the hit's ledger row), then the body exactly as it is sent
 * to JSON callers. Why the header: a JSON hit sends the stored bytes and needs nothing else of
 * the answer, so it no longer parses the whole completion (a few µs for a short answer, tens for
 * a long one, on every hit). A stream replay parses the body, once, when it asks for it.
 *
 * The header is a JSON array on one line (JSON.stringify never writes a raw newline), so the
 * first newline ends it whatever the body holds. Entries of the earlier format sit under other
 * keys (CACHE_KEY_VERSION in cache-key.ts) and expire with their TTL.
 */
export function encodeCacheEntry(raw: string, completion: ChatCompletion): string {
  return `${JSON.stringify([typeof completion.model === 'string' ? completion.model : '', readUsage(completion) ?? null])}\n${raw}`;
}

/** A cached answer: the body as stored, and the completion parsed only when someone asks. */
export class CachedAnswer {
  private parsed: ChatCompletion | undefined;

  constructor(
    /** The stored body, sent as is to JSON callers. */
    readonly raw: string,
    readonly model: string,
    readonly usage: Usage | undefined,
  ) {}

  get completion(): ChatCompletion {
    this.parsed ??= JSON.parse(this.raw) as ChatCompletion;
    return this.parsed;
  }
}

/** undefined for an entry that is not one (corrupt, or written by something else): a miss that overwrites it. */
export function decodeCacheEntry(entry: string): CachedAnswer | undefined {
  const end = entry.indexOf('\n');
  if (end < 0) return undefined;
  let header: unknown;
  try {
    header = JSON.parse(entry.slice(0, end));
  } catch {
    return undefined;
  }
  if (!Array.isArray(header) || typeof header[0] !== 'string') return undefined;
  const raw = entry.slice(end + 1);
  if (raw.length === 0) return undefined;
  return new CachedAnswer(raw, header[0], readUsage({ usage: header[1] as unknown }));
}
