import { describe, expect, it } from 'vitest';
import { type AuditEvent, canonicalEvent, canonicalJson, chainHash, GENESIS_HASH, type JsonObject, type JsonValue, toJson } from './audit-event.js';

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

/** The first canonicalJson, kept verbatim: rows already stored were hashed with its text. */
function originalCanonicalJson(value: JsonValue): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(originalCanonicalJson).join(',')}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((key) => `${JSON.stringify(key)}:${originalCanonicalJson(value[key] ?? null)}`).join(',')}}`;
}

function originalCanonicalEvent(e: AuditEvent): string {
  return originalCanonicalJson({
    id: e.id,
    at: e.at.toISOString(),
    actor_user_id: e.actorUserId,
    actor_key_id: e.actorKeyId,
    actor_role: e.actorRole,
    action: e.action,
    target_type: e.targetType,
    target_id: e.targetId,
    request_id: e.requestId,
    status: e.status,
    details: e.details,
  });
}

/** A small deterministic generator (no dependency): the same inputs on every run. */
function generator(seed: number) {
  let state = seed;
  const next = () => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return state / 2 ** 32;
  };
  const pick = <T>(items: readonly T[]): T => items[Math.floor(next() * items.length)];
  const strings = [
    '',
    'a',
    'plain text',
    'é',
    'ñandú',
    '日本語',
    '😀',
    'x\uD800y',
    '\uDC00',
    'q"uote',
    'back\\slash',
    'nl\n',
    'tab\t',
    '\u0000',
    '\u001f',
    '\u2028\u2029',
    '\u007f',
    '10',
    '9',
    '__proto__',
    'Z',
    'a b',
  ];
  const numbers = [
    0,
    -0,
    1,
    -1,
    42,
    1.5,
    -2.25,
    1e21,
    1e-7,
    123456789012345680000,
    Number.MAX_SAFE_INTEGER,
    Number.MIN_VALUE,
    0.1 + 0.2,
    NaN,
    Infinity,
    -Infinity,
  ];
  const value = (depth: number): JsonValue => {
    const r = next();
    if (depth > 3 || r < 0.45) {
      const s = next();
      if (s < 0.4) return pick(strings) + (next() < 0.3 ? pick(strings) : '');
      if (s < 0.75) return pick(numbers);
      if (s < 0.9) return next() < 0.5;
      return null;
    }
    if (r < 0.7) return Array.from({ length: Math.floor(next() * 5) }, () => value(depth + 1));
    const out: JsonObject = {};
    for (let i = Math.floor(next() * 7); i > 0; i--) out[pick(strings) + (next() < 0.5 ? String(i) : '')] = value(depth + 1);
    return out;
  };
  return { next, pick, value };
}

describe('canonicalJson: the text of every stored row stays the same', () => {
  it('matches the original on 20,000 varied values: nested objects and arrays, unicode, numbers, null', () => {
    const { value } = generator(20261129);
    for (let i = 0; i < 20_000; i++) {
      const v = value(0);
      expect(canonicalJson(v)).toBe(originalCanonicalJson(v));
    }
  });

  it('matches the original on the edge cases by name', () => {
    const cases: JsonValue[] = [
      {},
      [],
      [[]],
      { b: { d: [1, { z: null, a: '😀' }], c: -0 }, a: [true, false, null] },
      { '10': 1, '9': 2, a: 3, A: 4, '': 5, é: 6, e: 7 },
      { 'x\uD800': 'lone', 'k"ey': 'q', 'back\\': '\u0000\u2028' },
      [1e21, 1e-7, 5e-324, -1.7976931348623157e308, NaN, Infinity],
      'only a string',
      12,
      null,
      true,
    ];
    for (const v of cases) expect(canonicalJson(v)).toBe(originalCanonicalJson(v));
  });

  // An array with a hole at index 1, as `[1, , 3]` would write it.
  const sparse = () => {
    const a: number[] = [];
    a[0] = 1;
    a[2] = 3;
    return a;
  };

  it('writes what the original wrote for values outside JsonValue, and throws where it threw', () => {
    const odd = [[1, undefined, 2], { u: undefined, f: () => 1 }, new Date(0), sparse()] as unknown as JsonValue[];
    for (const v of odd) expect(canonicalJson(v)).toBe(originalCanonicalJson(v));
    expect(canonicalJson(undefined as unknown as JsonValue)).toBe(originalCanonicalJson(undefined as unknown as JsonValue));
    expect(() => canonicalJson({ n: 1n } as unknown as JsonValue)).toThrow(TypeError);
  });

  it('hashes events exactly as the original did, whatever the key order of their details (jsonb reorders them)', () => {
    const { value, pick, next } = generator(7);
    for (let i = 0; i < 2_000; i++) {
      const details: JsonObject = {};
      for (let k = Math.floor(next() * 12); k > 0; k--)
        details[pick(['door', 'model', 'task_type', 'attempts', 'end_user', 'cost_nanos', 'z', 'a', `k${k}`])] = value(1);
      const e: AuditEvent = {
        ...event,
        actorUserId: next() < 0.5 ? null : '6f1c1d0e-3c1a-4b1e-9a55-1d2f3e4a5b6d',
        actorRole: next() < 0.2 ? null : pick(['admin', 'user', 'x"y']),
        targetId: next() < 0.3 ? null : pick(['openai/gpt-4o-mini', '😀', '']),
        status: next() < 0.3 ? null : pick([200, 0, 999]),
        details,
      };
      expect(canonicalEvent(e)).toBe(originalCanonicalEvent(e));
      const reordered: AuditEvent = { ...e, details: Object.fromEntries(Object.entries(details).reverse()) };
      expect(canonicalEvent(reordered)).toBe(originalCanonicalEvent(e));
    }
  });
});
