/**
 * Entries that expire, bounded by their number and by a total weight the caller measures (the
 * memory driver: UTF-8 bytes; the Redis driver's near copies: characters). A Map keeps insertion
 * order, so eviction takes the oldest first; `get` with `touch` moves an entry to the end, which
 * makes that order least-recently-used. Expired entries are dropped when met.
 */
export class ExpiringEntries<V> {
  private readonly entries = new Map<string, { value: V; weight: number; expiresAt: number }>();
  private total = 0;

  constructor(
    private readonly maxEntries: number,
    private readonly maxWeight: number,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get weight(): number {
    return this.total;
  }

  /** The value under `key` if it has not expired at `now`; `touch` marks it most recently used. */
  get(key: string, now: number, touch = false): V | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    if (entry.expiresAt <= now) {
      this.delete(key);
      return undefined;
    }
    if (touch) {
      this.entries.delete(key);
      this.entries.set(key, entry);
    }
    return entry.value;
  }

  /**
   * Keeps `value` under `key` until `expiresAt`, replacing what was there, then evicts the oldest
   * entries until both bounds hold. One heavier than the whole bound is not kept (and replaces
   * nothing): it would only evict everything else.
   */
  set(key: string, value: V, weight: number, expiresAt: number): void {
    if (weight > this.maxWeight) return;
    this.delete(key);
    this.entries.set(key, { value, weight, expiresAt });
    this.total += weight;
    while (this.entries.size > this.maxEntries || this.total > this.maxWeight) {
      const oldest = this.entries.keys().next();
      if (oldest.done) break;
      this.delete(oldest.value);
    }
  }

  delete(key: string): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    this.entries.delete(key);
    this.total -= entry.weight;
  }

  clear(): void {
    this.entries.clear();
    this.total = 0;
  }

  /** Every entry's key and value, expired or not, oldest first; deleting while iterating is safe. */
  *[Symbol.iterator](): IterableIterator<[string, V]> {
    for (const [key, entry] of this.entries) yield [key, entry.value];
  }
}
