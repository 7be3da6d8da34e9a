import { type ChatCompletion, cleanUsage, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { replayChunks } from './stream-replay.js';

/**
 * A stored answer: one header line with what every hit needs (the model that answered and its
 * usage, for the response headers and the hit's ledger row, and the model its miss was recorded
 * as, so a hit is counted the same way), then the body exactly as it is sent
 * to JSON callers. Why the header: a JSON hit sends the stored bytes and needs nothing else of
 * the answer, so it no longer parses the whole completion (a few µs for a short answer, tens for
 * a long one, on every hit). A stream replay parses the body, once, when it asks for it.
 *
 * The header is a JSON array on one line (JSON.stringify never writes a raw newline), so the
 * first newline ends it whatever the body holds. Entries of the earlier format sit under other
 * keys (CACHE_KEY_VERSION in cache-key.ts) and expire with their TTL.
 */
export function encodeCacheEntry(raw: string, completion: ChatCompletion, recordedModel?: string): string {
  const header = [typeof completion.model === 'string' ? completion.model : '', readUsage(completion) ?? null];
  if (recordedModel !== undefined) header.push(recordedModel);
  return `${JSON.stringify(header)}\n${raw}`;
}

/**
 * A cached answer: the body as stored, and what a hit derives from it (the parsed completion, a
 * stream replay's payloads) made only when someone asks, then kept. CompletionCache hands the
 * same answer to every hit on an unchanged entry, so those are made once per entry, not per hit;
 * the parsed completion is frozen because it is shared.
 */
export class CachedAnswer {
  private parsed: ChatCompletion | undefined;
  private replayQuiet: readonly string[] | undefined;
  private replayWithUsage: readonly string[] | undefined;

  constructor(
    /** The stored body, sent as is to JSON callers. */
    readonly raw: string,
    readonly model: string,
    readonly usage: Usage | undefined,
    /** The model its miss was recorded as; undefined in an entry written before it was kept. */
    readonly recordedModel: string | undefined = undefined,
  ) {}

  get completion(): ChatCompletion {
    this.parsed ??= deepFreeze(JSON.parse(this.raw) as ChatCompletion);
    return this.parsed;
  }

  /** The SSE payloads that replay this answer (replayChunks), with the usage chunk or without. */
  replay(includeUsage: boolean): readonly string[] {
    if (includeUsage) return (this.replayWithUsage ??= replayChunks(this.completion, true));
    return (this.replayQuiet ??= replayChunks(this.completion, false));
  }
}

/** Freezes every object and array in a parsed JSON value; with its own stack, so no depth an upstream sends can overflow it. */
function deepFreeze<T>(value: T): T {
  const pending: unknown[] = [value];
  while (pending.length > 0) {
    const next = pending.pop();
    if (typeof next !== 'object' || next === null || Object.isFrozen(next)) continue;
    Object.freeze(next);
    for (const inner of Object.values(next)) pending.push(inner);
  }
  return value;
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
  return new CachedAnswer(raw, header[0], cleanUsage(header[1]), typeof header[2] === 'string' ? header[2] : undefined);
}
