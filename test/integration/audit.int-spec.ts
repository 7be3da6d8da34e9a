import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { AuditRepository } from '../../src/audit/audit.repository.js';
import { type AuditOptions, AuditService } from '../../src/audit/audit.service.js';
import { SystemClock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { type OpenedDatabase, openDatabase } from '../../src/database/data-source.js';
import { ReadinessRegistry } from '../../src/health/readiness.js';
import type { Principal } from '../../src/identity/principal.js';
import { createTestDatabase, DB_KINDS, type TestDatabase } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';

const admin: Principal = {
  keyId: randomUUID(),
  keyPrefix: 'gh-abcdefg',
  userId: randomUUID(),
  departmentId: randomUUID(),
  role: 'admin',
  cacheScope: 'user',
  expiresAt: undefined,
};

function writer(db: OpenedDatabase, options: Partial<AuditOptions> = {}, readiness = new ReadinessRegistry()): AuditService {
  const service = new AuditService(
    new AuditRepository(db.dataSource),
    new SystemClock(),
    { logger: createLogger('silent') },
    { flushMs: 60_000, batchSize: 100, maxBuffered: 100_000, maxBackoffMs: 50, ...options },
    readiness,
  );
  return service;
}

function recordMany(service: AuditService, n: number, tag: string): void {
  for (let i = 0; i < n; i += 1) {
    service.record({
      principal: admin,
      action: 'PUT /admin/routing',
      targetType: 'routing',
      targetId: String(i),
      requestId: `${tag}-${i}`,
      status: 200,
      details: { tag, i, body: { comment: `change ${i}` } },
    });
  }
}

async function count(db: OpenedDatabase): Promise<number> {
  const [row] = await db.dataSource.query<Array<{ n: number }>>('SELECT count(*)::int AS n FROM audit_events');
  return row?.n ?? 0;
}

async function seqs(db: OpenedDatabase): Promise<number[]> {
  const rows = await db.dataSource.query<Array<{ seq: string }>>('SELECT seq FROM audit_events ORDER BY seq');
  return rows.map((r) => Number(r.seq));
}

describe.each(DB_KINDS)('audit trail on %s', (kind) => {
  let testDb: TestDatabase;
  let db: OpenedDatabase;
  const services: AuditService[] = [];

  beforeAll(async () => {
    testDb = await createTestDatabase(kind);
    db = await openDatabase(testDb.target, DATABASE_CONTENT);
  });
  afterEach(() => {
    for (const s of services.splice(0)) s.stop();
  });
  afterAll(async () => {
    await db.close();
    await testDb.drop();
  });

  async function fresh(options: Partial<AuditOptions> = {}, readiness?: ReadinessRegistry): Promise<AuditService> {
    // Each test starts from an empty, unchained table (the append-only trigger is bypassed for the reset only).
    await db.dataSource.query('ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_truncate');
    await db.dataSource.query('TRUNCATE audit_events');
    await db.dataSource.query('ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_truncate');
    await db.dataSource.query(`UPDATE audit_chain_head SET seq = 0, hash = repeat('0', 64)`);
    const service = writer(db, options, readiness);
    services.push(service);
    return service;
  }

  it('writes every event in batches: one INSERT transaction per batch, one unbroken chain', async () => {
    const service = await fresh({ batchSize: 100 });
    recordMany(service, 1234, 'batch');
    expect(await service.flush()).toBe(true);

    expect(await count(db)).toBe(1234);
    // Rows written by one transaction share xmin: 13 batches of at most 100, not 1234 INSERTs.
    const [tx] = await db.dataSource.query<Array<{ n: number }>>('SELECT count(DISTINCT xmin::text)::int AS n FROM audit_events');
    expect(tx?.n).toBe(Math.ceil(1234 / 100));
    expect(service.stats()).toMatchObject({ buffered: 0, written: 1234, dropped: 0, failing: false });

    const verify = await service.verify({});
    expect(verify).toMatchObject({ ok: true, checked: 1234, first_break: null });
    const [newest] = (await service.list({ limit: 1 })).events;
    expect(newest).toMatchObject({
      actorUserId: admin.userId,
      actorKeyId: admin.keyId,
      actorRole: 'admin',
      action: 'PUT /admin/routing',
      targetType: 'routing',
      targetId: '1233',
      requestId: 'batch-1233',
      status: 200,
      details: { tag: 'batch', i: 1233, body: { comment: 'change 1233' }, key_prefix: 'gh-abcdefg', department_id: admin.departmentId },
    });
    expect(verify.head).toEqual({ seq: Number(newest?.seq), hash: newest?.hash });
  });

  it('stores awkward text exactly as recorded and verifies it: the batch is sent as the canonical text', async () => {
    const service = await fresh();
    const awkward = {
      quote: 'say "hi" \\ back\\slash',
      control: 'tab\tnew\nline\r\u0001\u001f',
      unicode: 'é ß 中文 😀 \u2028\u2029',
      broken: 'lone \uD800 and \uDC00, nul \u0000 here',
      numbers: [0, -0, 1.5, -2, 1e21, 1e-7, 0.1 + 0.2, Number.MAX_SAFE_INTEGER],
      nested: { z: [true, false, null, { '': 'empty key', 'k"ey': 1 }], a: {} },
    };
    service.record({ principal: admin, action: 'POST /admin/"odd"\\path', targetType: 'key\nline', targetId: 'id "1"', requestId: 'req\u0000x', status: 201, details: awkward });
    expect(await service.flush()).toBe(true);

    const [stored] = (await service.list({ limit: 1 })).events;
    expect(stored).toMatchObject({
      action: 'POST /admin/"odd"\\path',
      targetType: 'key\nline',
      targetId: 'id "1"',
      requestId: 'reqx',
      status: 201,
      details: {
        ...awkward,
        broken: 'lone \uFFFD and \uFFFD, nul  here',
        numbers: [0, 0, 1.5, -2, 1e21, 1e-7, 0.1 + 0.2, Number.MAX_SAFE_INTEGER],
        key_prefix: admin.keyPrefix,
        department_id: admin.departmentId,
      },
    });
    expect(await service.verify({})).toMatchObject({ ok: true, checked: 1, first_break: null });
  });

  it('flushes on its own once a batch is full or the interval passes', async () => {
    const bySize = await fresh({ batchSize: 10, flushMs: 60_000 });
    recordMany(bySize, 10, 'size');
    await pollUntil(async () => expect(await count(db)).toBe(10));

    const byTime = writer(db, { batchSize: 10_000, flushMs: 20 });
    services.push(byTime);
    byTime.start();
    recordMany(byTime, 3, 'time');
    await pollUntil(async () => expect(await count(db)).toBe(13));
    expect((await byTime.verify({})).ok).toBe(true);
  });

  it('refuses UPDATE and DELETE; a tampered, deleted or truncated-away row is reported at its seq', async () => {
    const service = await fresh();
    recordMany(service, 30, 'tamper');
    await service.flush();
    const all = await seqs(db);
    const target = all[9];

    await expect(db.dataSource.query(`UPDATE audit_events SET details = '{"x":1}' WHERE seq = $1`, [target])).rejects.toThrow(/append-only/);
    await expect(db.dataSource.query('DELETE FROM audit_events WHERE seq = $1', [target])).rejects.toThrow(/append-only/);
    expect((await service.verify({})).ok).toBe(true);
    // A range that starts after the newest row has nothing to recompute but the head's own link.
    expect(await service.verify({ from: new Date(Date.now() + 3_600_000) })).toMatchObject({ ok: true, first_break: null });

    // Someone who gets around the trigger (a superuser) still cannot hide the edit.
    await db.dataSource.query('ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update');
    try {
      await db.dataSource.query(`UPDATE audit_events SET details = jsonb_set(details, '{tag}', '"edited"') WHERE seq = $1`, [target]);
      expect(await service.verify({})).toMatchObject({ ok: false, checked: 10, first_break: target });
      // Ranges that end before the edit still verify; ranges that start after it check their own links.
      expect(await service.verify({ toSeq: String(all[8]) })).toMatchObject({ ok: true, checked: 9, first_break: null });

      const deleted = all[19];
      await db.dataSource.query('DELETE FROM audit_events WHERE seq = $1', [deleted]);
      expect(await service.verify({ fromSeq: String(all[10]) })).toMatchObject({ ok: false, first_break: all[20] });

      // Dropping the newest rows leaves every remaining link intact; the chain head gives it away.
      const last = all.at(-1)!;
      await db.dataSource.query('DELETE FROM audit_events WHERE seq >= $1', [all[27]]);
      expect(await service.verify({ fromSeq: String(all[21]) })).toMatchObject({ ok: false, first_break: last });
      // Also when the range starts after every row still there: the head names a row that is gone.
      const [newest] = await db.dataSource.query<Array<{ at: Date }>>('SELECT max(at) AS at FROM audit_events');
      const after = new Date(new Date(newest.at).getTime() + 1000);
      expect(await service.verify({ from: after })).toMatchObject({ ok: false, first_break: last });
    } finally {
      await db.dataSource.query('ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update');
    }
  });

  // Before, the hash covered `at` to the millisecond and the column keeps microseconds: moving a
  // row's time by less than a millisecond verified as intact.
  it('reports a row whose time was moved by less than a millisecond', async () => {
    const service = await fresh();
    recordMany(service, 5, 'sub-ms');
    await service.flush();
    const all = await seqs(db);
    const target = all.at(-3)!;
    expect((await service.verify({})).ok).toBe(true);
    await db.dataSource.query('ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update');
    try {
      await db.dataSource.query(`UPDATE audit_events SET at = at + interval '700 microseconds' WHERE seq = $1`, [target]);
      expect(await service.verify({})).toMatchObject({ ok: false, first_break: target });
    } finally {
      await db.dataSource.query('ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update');
    }
  });

  it('keeps events in memory while the database refuses writes, reports degraded, drops beyond the bound and records the gap', async () => {
    const readiness = new ReadinessRegistry();
    const service = await fresh({ batchSize: 20, flushMs: 10, maxBuffered: 50, maxBackoffMs: 40 }, readiness);
    service.onModuleInit();
    const check = readiness.checks.get('audit')!;
    recordMany(service, 5, 'before');
    await pollUntil(async () => expect(await count(db)).toBe(5));
    expect(await check()).toMatchObject({ state: 'up', details: { buffered: 0, dropped: 0 } });

    await db.dataSource.query('ALTER TABLE audit_events RENAME TO audit_events_away');
    try {
      // record() neither throws nor waits, whatever the database does.
      recordMany(service, 60, 'outage');
      await pollUntil(async () => expect(await check()).toMatchObject({ state: 'degraded', details: { buffered: 50, dropped: 10, failing: true } }));
      expect(service.stats()).toMatchObject({ buffered: 50, dropped: 10, written: 5, failing: true });
    } finally {
      await db.dataSource.query('ALTER TABLE audit_events_away RENAME TO audit_events');
    }

    // Retried with backoff until the database takes them; the gap is written into the chain.
    await pollUntil(async () => expect(await check()).toMatchObject({ state: 'up', details: { buffered: 0, dropped: 10 } }));
    expect(await count(db)).toBe(5 + 50 + 1);
    const gap = (await service.list({ action: 'audit.events_dropped', limit: 5 })).events;
    expect(gap).toHaveLength(1);
    expect(gap[0]?.details).toMatchObject({ count: 10 });
    expect(await service.verify({})).toMatchObject({ ok: true, checked: 56 });
  });

  it('drains everything on a graceful shutdown', async () => {
    const service = await fresh({ batchSize: 10_000, flushMs: 60_000 });
    service.start();
    recordMany(service, 25, 'shutdown');
    expect(await count(db)).toBe(0);
    service.beforeApplicationShutdown();
    service.record({ action: 'late', details: {} });
    await service.onApplicationShutdown();
    expect(await count(db)).toBe(26);
  });

  it('pages newest first on seq and filters by actor, action and time', async () => {
    const service = await fresh();
    const other: Principal = { ...admin, userId: randomUUID(), keyId: randomUUID(), keyPrefix: 'gh-zzzzzzz', role: 'user' };
    recordMany(service, 7, 'page');
    service.record({ principal: other, action: 'completion', targetType: 'model', targetId: 'openai/gpt-4o-mini', status: 200, details: {} });
    service.record({ action: 'GET /admin/audit', status: 401, details: { key_prefix: 'gh-badbadb' } });
    await service.flush();

    const seen: string[] = [];
    let cursor: string | undefined;
    for (let page = 0; page < 10; page += 1) {
      const { events, nextCursor } = await service.list({ limit: 4, beforeSeq: cursor });
      seen.push(...events.map((e) => e.seq));
      if (!nextCursor) break;
      cursor = nextCursor;
    }
    expect(seen.map(Number)).toEqual([...(await seqs(db))].reverse());

    expect((await service.list({ actor: other.userId, limit: 50 })).events.map((e) => e.action)).toEqual(['completion']);
    expect((await service.list({ actor: other.keyId, limit: 50 })).events).toHaveLength(1);
    expect((await service.list({ actor: 'gh-badbadb', limit: 50 })).events.map((e) => e.status)).toEqual([401]);
    expect((await service.list({ action: 'PUT /admin/routing', limit: 50 })).events).toHaveLength(7);
    expect((await service.list({ action: 'PUT /admin/*', limit: 50 })).events).toHaveLength(7);
    expect((await service.list({ from: new Date(Date.now() + 60_000), limit: 50 })).events).toHaveLength(0);
    expect((await service.list({ to: new Date(Date.now() + 60_000), limit: 50 })).events).toHaveLength(9);
  });
});

describe('two writers on one PostgreSQL', () => {
  let testDb: TestDatabase;
  let first: OpenedDatabase;
  let second: OpenedDatabase;

  beforeAll(async () => {
    testDb = await createTestDatabase('postgres');
    first = await openDatabase(testDb.target, DATABASE_CONTENT);
    second = await openDatabase(testDb.target, DATABASE_CONTENT);
  });
  afterAll(async () => {
    await first.close();
    await second.close();
    await testDb.drop();
  });

  it('produce one unbroken chain: the chain head row serialises their batches', async () => {
    const a = writer(first, { batchSize: 7 });
    const b = writer(second, { batchSize: 7 });
    recordMany(a, 300, 'a');
    recordMany(b, 300, 'b');
    // Both drain at once, each through its own connection pool: 43 transactions each, contending.
    const [okA, okB] = await Promise.all([a.flush(), b.flush()]);
    expect([okA, okB]).toEqual([true, true]);

    expect(await count(first)).toBe(600);
    expect(await a.verify({})).toMatchObject({ ok: true, checked: 600, first_break: null });
    // Every link joins the row before it, whichever instance wrote either.
    const rows = await first.dataSource.query<Array<{ tag: string; prev_hash: string; hash: string }>>(
      "SELECT details->>'tag' AS tag, prev_hash, hash FROM audit_events ORDER BY seq",
    );
    for (let i = 1; i < rows.length; i += 1) expect(rows[i]?.prev_hash).toBe(rows[i - 1]?.hash);
    // The writers really interleaved (otherwise this test would prove nothing about the lock).
    const switches = rows.filter((r, i) => i > 0 && r.tag !== rows[i - 1]?.tag).length;
    expect(switches).toBeGreaterThan(0);
  });
});
