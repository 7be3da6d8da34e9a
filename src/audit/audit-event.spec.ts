import { describe, expect, it } from 'vitest';
import { type AuditEvent, canonicalEvent, canonicalJson, chainHash, GENESIS_HASH, toJson } from './audit-event.js';

const event: AuditEvent = {
  id: '6f1c1d0e-3c1a-4b1e-9a55-1d2f3e4a5b6c',
  at: new Date('2026-01-05T12:00:00.123Z'),
  actorUserId: null,
  actorKeyId: null,
  actorRole: 'admin',
  action: 'PUT /admin/routing',
  targetType: 'routing',
  targetId: '7',
  requestId: 'req-1',
  status: 200,
  details: { b: 1, a: { y: [1, 'x'], x: null } },
};

describe('canonical JSON and the hash chain', () => {
  it('is independent of key order, so a jsonb round trip (which reorders keys) hashes the same', () => {
    const reordered: AuditEvent = { ...event, details: { a: { x: null, y: [1, 'x'] }, b: 1 } };
    expect(canonicalEvent(reordered)).toBe(canonicalEvent(event));
    expect(chainHash(GENESIS_HASH, reordered)).toBe(chainHash(GENESIS_HASH, event));
    expect(canonicalJson({ b: 1, a: [{ d: 1, c: 2 }] })).toBe('{"a":[{"c":2,"d":1}],"b":1}');
  });

  it('changes with any field and with the previous hash', () => {
    const base = chainHash(GENESIS_HASH, event);
    expect(base).toMatch(/^[0-9a-f]{64}$/);
    expect(chainHash(GENESIS_HASH, { ...event, status: 201 })).not.toBe(base);
    expect(chainHash(GENESIS_HASH, { ...event, details: { ...event.details, b: 2 } })).not.toBe(base);
    expect(chainHash(base, event)).not.toBe(base);
  });

  it('makes values storable: no NUL, no lone surrogates, bigint as text, bounded size', () => {
    expect(toJson({ s: 'a\u0000b', lone: 'x\uD800y', n: 10n, inf: Infinity, u: undefined })).toEqual({ s: 'ab', lone: 'x\uFFFDy', n: '10', inf: null });
    const long = toJson('é'.repeat(1000)) as string;
    expect(long.length).toBeLessThan(600);
    const wide = toJson(Array.from({ length: 200 }, (_, i) => i)) as unknown[];
    expect(wide).toHaveLength(51);
    // A surrogate pair cut at the limit must not leave half of it behind.
    const emoji = toJson(`${'a'.repeat(499)}😀tail`) as string;
    expect(emoji.endsWith('…')).toBe(true);
    expect(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])/.test(emoji)).toBe(false);
  });
});
