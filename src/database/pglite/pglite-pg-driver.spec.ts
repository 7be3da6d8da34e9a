import type { PGlite } from '@electric-sql/pglite';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openPglite, dumpPgliteTemplate } from './pglite-database.js';
import {
  closePglite,
  createPglitePgDriver,
  type PgConnectCallback,
  type PgResult,
  type PgRow,
  type PglitePool,
  type PglitePoolClient,
  withPgliteSession,
} from './pglite-pg-driver.js';

// One initdb for the whole file (~3.5 s); everything else shares it or loads its template.
let db: PGlite;
let pool: PglitePool;

beforeAll(async () => {
  db = await openPglite({ dataDir: 'memory://' });
  const driver = createPglitePgDriver(db);
  pool = new driver.Pool();
  pool.on('error', () => undefined);
}, 60_000);

afterAll(async () => {
  if (!pool.ending) await pool.end();
  await closePglite(db);
});

/** Narrows the pg-style "one result or one per statement" union for single statements. */
function single(result: PgResult | PgResult[]): PgResult {
  if (Array.isArray(result)) throw new Error(`expected one result, got ${result.length}`);
  return result;
}

function firstRow(result: PgResult): PgRow {
  const [row] = result.rows;
  if (!row || Array.isArray(row)) throw new Error('expected an object row');
  return row;
}

async function q(sql: string, params?: unknown[]): Promise<PgResult> {
  return single(await pool.query(sql, params));
}

function connectWithCallback(target: PglitePool): Promise<{ client: PglitePoolClient; release: (err?: Error | boolean) => void }> {
  return new Promise((resolve, reject) => {
    const callback: PgConnectCallback = (err, client, release) => {
      if (err || !client) reject(err ?? new Error('no client'));
      else resolve({ client, release });
    };
    target.connect(callback);
  });
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

describe('result shape', () => {
  it('looks like pg results for SELECT, INSERT, UPDATE and DDL', async () => {
    const created = await q('CREATE TABLE shape (id int4 PRIMARY KEY, label text)');
    expect(created).toMatchObject({ command: 'CREATE', rowCount: null, rows: [] });

    const inserted = await q('INSERT INTO shape VALUES ($1, $2), ($3, $4) RETURNING id', [1, 'a', 2, 'b']);
    expect(inserted).toMatchObject({ command: 'INSERT', rowCount: 2, oid: 0, rows: [{ id: 1 }, { id: 2 }] });

    const updated = await q('UPDATE shape SET label = $1 WHERE id > $2', ['z', 0]);
    expect(updated).toMatchObject({ command: 'UPDATE', rowCount: 2, rows: [] });

    const selected = await q('SELECT id, label FROM shape ORDER BY id');
    expect(selected.command).toBe('SELECT');
    expect(selected.rowCount).toBe(2);
    expect(selected.rows).toEqual([
      { id: 1, label: 'z' },
      { id: 2, label: 'z' },
    ]);
    expect(selected.fields.map((f) => [f.name, f.dataTypeID])).toEqual([
      ['id', 23],
      ['label', 25],
    ]);
  });

  it('supports rowMode array and lets the last duplicate column win in object mode (like pg)', async () => {
    const asArray = single(await pool.query({ text: 'SELECT 1 AS a, 2 AS a', rowMode: 'array' }));
    expect(asArray.rows).toEqual([[1, 2]]);
    const asObject = await q('SELECT 1 AS a, 2 AS a');
    expect(asObject.rows).toEqual([{ a: 2 }]);
  });

  it('runs several statements without parameters and returns one result per statement', async () => {
    const results = await pool.query('CREATE TABLE multi (n int); INSERT INTO multi VALUES (1), (2); SELECT sum(n) AS s FROM multi');
    expect(Array.isArray(results)).toBe(true);
    const list = results as PgResult[];
    expect(list.map((r) => r.command)).toEqual(['CREATE', 'INSERT', 'SELECT']);
    expect(list[2]?.rows).toEqual([{ s: '3' }]);
  });
});

describe('value types match pg defaults', () => {
  it('parses results the way pg does', async () => {
    const big = '9007199254740993'; // 2^53 + 1
    const row = firstRow(
      await q(
        `SELECT $1::int8 AS big, 12.50::numeric AS num, 7::int4 AS int, 3::int2 AS small, 1.5::float8 AS dbl,
                true AS yes, '2024-05-06T07:08:09.123Z'::timestamptz AS tstz, '{"a":[1,{"b":null}]}'::jsonb AS jb,
                '{"x":1}'::json AS j, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id, ARRAY[1,2,3]::int4[] AS ints,
                ARRAY['x', NULL, 'y,z']::text[] AS texts, ARRAY[$1::int8] AS bigs, '\\x0102ff'::bytea AS bytes,
                NULL::int4 AS nothing, '2024-05-06'::date AS day, '2024-05-06 07:08:09'::timestamp AS ts`,
        [big],
      ),
    );
    expect(row).toMatchObject({
      big,
      num: '12.50',
      int: 7,
      small: 3,
      dbl: 1.5,
      yes: true,
      jb: { a: [1, { b: null }] },
      j: { x: 1 },
      id: 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
      ints: [1, 2, 3],
      texts: ['x', null, 'y,z'],
      bigs: [big],
      nothing: null,
    });
    expect(row['tstz']).toEqual(new Date('2024-05-06T07:08:09.123Z'));
    expect(Buffer.from(row['bytes'] as Uint8Array)).toEqual(Buffer.from([1, 2, 255]));
    // `date` and `timestamp` go through pg's own parsers (local time), whatever they do.
    // pg-types types getTypeParser as returning `any`; it is always a text parser here.
    const parseDate = pg.types.getTypeParser(1082, 'text') as (value: string) => unknown;
    const parseTimestamp = pg.types.getTypeParser(1114, 'text') as (value: string) => unknown;
    expect(row['day']).toEqual(parseDate('2024-05-06'));
    expect(row['ts']).toEqual(parseTimestamp('2024-05-06 07:08:09'));
  });

  it('prepares parameters the way pg does', async () => {
    await q(`CREATE TABLE params (
      id serial PRIMARY KEY, big int8, ts timestamptz, local timestamp, doc jsonb, tags text[], nums int4[],
      raw bytea, flag boolean, amount numeric)`);
    const when = new Date('2030-01-02T03:04:05.678Z');
    const inserted = await q(
      `INSERT INTO params (big, ts, local, doc, tags, nums, raw, flag, amount)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *`,
      [
        2n ** 62n,
        when,
        when,
        { nested: { list: [1, 'two'] }, quote: 'it"s' },
        ['a', 'b "q"', null, 'c\\d'],
        [1, 2],
        Buffer.from([0, 1, 2, 250]),
        true,
        '12345678901234567890.0001',
      ],
    );
    const row = firstRow(inserted);
    expect(row).toMatchObject({
      big: (2n ** 62n).toString(),
      doc: { nested: { list: [1, 'two'] }, quote: 'it"s' },
      tags: ['a', 'b "q"', null, 'c\\d'],
      nums: [1, 2],
      flag: true,
      amount: '12345678901234567890.0001',
    });
    expect(row['ts']).toEqual(when);
    // pg sends Dates as local time with offset, so `timestamp` round-trips as local wall time.
    expect(row['local']).toEqual(when);
    expect(Buffer.from(row['raw'] as Uint8Array)).toEqual(Buffer.from([0, 1, 2, 250]));

    const nulls = await q('SELECT $1::text AS a, $2::int AS b', [null, undefined]);
    expect(nulls.rows).toEqual([{ a: null, b: null }]);
    const toPostgres = await q('SELECT $1::text AS v', [{ toPostgres: () => 'custom' }]);
    expect(toPostgres.rows).toEqual([{ v: 'custom' }]);
  });

  it('keeps parseInt8 and type parsers local to one driver', async () => {
    const driver = createPglitePgDriver(db);
    // TypeORM only sets parseInt8 through an *own* setter.
    expect(typeof Object.getOwnPropertyDescriptor(driver.defaults, 'parseInt8')?.set).toBe('function');
    expect(driver.defaults.parseInt8).toBe(false);
    driver.defaults.parseInt8 = true;
    expect(driver.defaults.parseInt8).toBe(true);
    driver.types.setTypeParser(1700, (value) => Number(value));
    const other = new driver.Pool();
    try {
      expect(single(await other.query('SELECT 5::int8 AS n, 1.5::numeric AS d')).rows).toEqual([{ n: 5, d: 1.5 }]);
      expect((await q('SELECT 5::int8 AS n, 1.5::numeric AS d')).rows).toEqual([{ n: '5', d: '1.5' }]);
    } finally {
      await other.end();
    }
  });

  it('does not offer a native binding (TypeORM would swap in pg-native)', () => {
    expect('native' in createPglitePgDriver(db)).toBe(false);
  });
});

describe('errors', () => {
  it('rejects a failing statement with a pg DatabaseError and keeps the pool usable', async () => {
    const failure = await pool.query('SELECT 1/0').catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(pg.DatabaseError);
    expect(failure).toMatchObject({ code: '22012', message: 'division by zero', severity: 'ERROR' });

    const constraint = await pool
      .query('INSERT INTO shape (id, label) VALUES ($1, $2)', [1, 'dup'])
      .catch((error: unknown) => error);
    expect(constraint).toMatchObject({ code: '23505', constraint: 'shape_pkey', table: 'shape' });

    expect((await q('SELECT 1 AS ok')).rows).toEqual([{ ok: 1 }]);
  });

  it('passes errors to the callback form (TypeORM uses it for CREATE EXTENSION)', async () => {
    const { client, release } = await connectWithCallback(pool);
    try {
      const error = await new Promise<Error | null>((resolve) => {
        client.query('CREATE EXTENSION IF NOT EXISTS "no_such_extension"', (err) => resolve(err));
      });
      expect(error?.message).toMatch(/no_such_extension/);
      const result = await new Promise<PgResult | PgResult[] | undefined>((resolve, reject) => {
        client.query('SELECT 2 AS two', (err, res) => (err ? reject(err) : resolve(res)));
      });
      expect(result && single(result).rows).toEqual([{ two: 2 }]);
    } finally {
      release();
    }
  });

  it('rejects (does not throw) when a parameter cannot be prepared', async () => {
    const circular: Record<string, unknown> = {};
    circular['self'] = circular;
    await expect(pool.query('SELECT $1::jsonb', [circular])).rejects.toThrow(/circular/i);
    expect((await q('SELECT 1 AS ok')).rows).toEqual([{ ok: 1 }]);
  });

  it('runs a multi-statement batch atomically and reports its error', async () => {
    await expect(pool.query('CREATE TABLE half (n int); INSERT INTO half VALUES (1/0)')).rejects.toMatchObject({ code: '22012' });
    await expect(pool.query('SELECT * FROM half')).rejects.toMatchObject({ code: '42P01' });
  });
});

describe('exclusive session', () => {
  it('hands the session to one client at a time, FIFO', async () => {
    const first = await pool.connect();
    const order: string[] = [];
    const second = pool.connect().then((client) => {
      order.push('second');
      return client;
    });
    const third = pool.connect().then((client) => {
      order.push('third');
      return client;
    });
    await tick();
    expect(order).toEqual([]);
    expect(pool.waitingCount).toBe(2);
    expect(pool.idleCount).toBe(0);
    expect(pool.totalCount).toBe(1);

    first.release();
    const secondClient = await second;
    await tick();
    expect(order).toEqual(['second']);
    secondClient.release();
    (await third).release();
    await tick();
    expect(order).toEqual(['second', 'third']);
    expect(pool.waitingCount).toBe(0);
    expect(pool.idleCount).toBe(1);
  });

  it('rolls back a transaction left open by a released client', async () => {
    await q('CREATE TABLE leak (n int)');
    const first = await pool.connect();
    await first.query('BEGIN');
    await first.query('INSERT INTO leak VALUES (1)');
    first.release();

    const second = await pool.connect();
    try {
      expect(db.isInTransaction()).toBe(false);
      expect(single(await second.query('SELECT count(*)::int AS c FROM leak')).rows).toEqual([{ c: 0 }]);
    } finally {
      second.release();
    }
  });

  it('rolls back an aborted transaction so the next holder is not poisoned', async () => {
    const first = await pool.connect();
    await first.query('BEGIN');
    await expect(first.query('SELECT 1/0')).rejects.toMatchObject({ code: '22012' });
    await expect(first.query('SELECT 1')).rejects.toMatchObject({ code: '25P02' });
    first.release(new Error('broken'));

    expect((await q('SELECT 1 AS ok')).rows).toEqual([{ ok: 1 }]);
  });

  it('refuses queries from a client after it was released', async () => {
    const client = await pool.connect();
    client.release();
    client.release(); // idempotent
    await expect(client.query('SELECT 1')).rejects.toThrow(/released/);
  });

  it('finishes queries issued before release, then cleans up', async () => {
    const client = await pool.connect();
    await client.query('BEGIN');
    const pending = client.query('SELECT pg_sleep(0.05), 1 AS done');
    client.release();
    expect(single(await pending).rows[0]).toMatchObject({ done: 1 });
    expect((await q('SELECT 1 AS ok')).rows).toEqual([{ ok: 1 }]);
    expect(db.isInTransaction()).toBe(false);
  });

  it('times out a waiter when connectionTimeoutMillis is set, leaving the queue intact', async () => {
    const driver = createPglitePgDriver(db);
    const impatient = new driver.Pool({ connectionTimeoutMillis: 50 });
    const holder = await pool.connect();
    try {
      await expect(impatient.connect()).rejects.toThrow(/timeout exceeded/);
      expect(impatient.waitingCount).toBe(0);
    } finally {
      holder.release();
    }
    const client = await impatient.connect();
    client.release();
    await impatient.end();
  });

  it('shares the lock between pools and helpers on the same PGlite instance', async () => {
    const otherPool = new (createPglitePgDriver(db).Pool)();
    const holder = await pool.connect();
    let helperRan = false;
    const helper = withPgliteSession(db, async (session) => {
      helperRan = true;
      return (await session.query<{ ok: number }>('SELECT 1 AS ok')).rows[0]?.ok;
    });
    const viaOtherPool = otherPool.query('SELECT 2 AS ok');
    await tick();
    expect(helperRan).toBe(false);
    holder.release();
    expect(await helper).toBe(1);
    expect(single(await viaOtherPool).rows).toEqual([{ ok: 2 }]);
    await otherPool.end();
  });

  it('forwards notices to the client', async () => {
    const client = await pool.connect();
    try {
      const notices: string[] = [];
      client.on('notice', (notice: { message?: string }) => notices.push(notice.message ?? ''));
      await client.query(`DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$`);
      expect(notices).toEqual(['hello 42']);
    } finally {
      client.release();
    }
  });
});

describe('lifecycle', () => {
  it('ends a pool: resolves after checked-out clients return; later connects fail', async () => {
    const driver = createPglitePgDriver(db);
    const local = new driver.Pool();
    const client = await local.connect();
    const queued = local.connect();
    let ended = false;
    const ending = local.end().then(() => {
      ended = true;
    });
    await expect(queued).rejects.toThrow(/after calling end/);
    await tick();
    expect(ended).toBe(false);
    client.release();
    await ending;
    expect(local.totalCount).toBe(0);
    await expect(local.connect()).rejects.toThrow(/after calling end/);
    const second = await new Promise<Error | undefined>((resolve) => local.end((err) => resolve(err)));
    expect(second?.message).toMatch(/more than once/);
  });

  it('closePglite waits for the current holder, then fails everyone else', async () => {
    const template = await dumpPgliteTemplate(db);
    const copy = await openPglite({ dataDir: 'memory://', loadDataDir: template });
    expect((await copy.query<{ n: number }>('SELECT count(*)::int AS n FROM shape')).rows).toEqual([{ n: 2 }]);
    const local = new (createPglitePgDriver(copy).Pool)();
    const holder = await local.connect();
    const closing = closePglite(copy);
    const late = local.connect();
    await tick();
    expect(copy.closed).toBe(false);
    holder.release();
    await closing;
    expect(copy.closed).toBe(true);
    await expect(late).rejects.toThrow(/closed/);
    await expect(local.connect()).rejects.toThrow(/closed/);
    await local.end();
    await closePglite(copy); // idempotent
  }, 30_000);
});
