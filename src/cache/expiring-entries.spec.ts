import { describe, expect, it } from 'vitest';
import { ExpiringEntries } from './expiring-entries.js';

describe('ExpiringEntries', () => {
  it('answers until an entry expires, then drops it', () => {
    const e = new ExpiringEntries<string>(10, 100);
    e.set('a', 'A', 1, 1000);
    expect(e.get('a', 999)).toBe('A');
    expect(e.get('a', 1000)).toBeUndefined();
    expect(e.size).toBe(0);
    expect(e.weight).toBe(0);
  });

  it('evicts the oldest first by count and by weight, and replaces what a key held', () => {
    const e = new ExpiringEntries<string>(2, 10);
    e.set('a', 'A', 4, 1000);
    e.set('b', 'B', 4, 1000);
    e.set('c', 'C', 4, 1000);
    expect([...e].map(([k]) => k)).toEqual(['b', 'c']);
    e.set('b', 'B2', 9, 1000);
    expect([...e]).toEqual([['b', 'B2']]);
    expect(e.weight).toBe(9);
  });

  it('moves a touched entry to the end, so it is evicted last', () => {
    const e = new ExpiringEntries<string>(2, 100);
    e.set('a', 'A', 1, 1000);
    e.set('b', 'B', 1, 1000);
    expect(e.get('a', 0, true)).toBe('A');
    e.set('c', 'C', 1, 1000);
    expect([...e].map(([k]) => k)).toEqual(['a', 'c']);
  });

  it('keeps nothing heavier than the whole bound, and leaves what the key held', () => {
    const e = new ExpiringEntries<string>(10, 5);
    e.set('a', 'A', 5, 1000);
    e.set('a', 'too big', 6, 1000);
    expect(e.get('a', 0)).toBe('A');
    e.clear();
    expect([e.size, e.weight]).toEqual([0, 0]);
  });
});
