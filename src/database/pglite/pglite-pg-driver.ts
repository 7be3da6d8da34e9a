/**
 * A `pg`-shaped driver module that lets TypeORM's `postgres` driver run on PGlite.
 *
 * PGlite is one Postgres backend in one WASM instance: one session, one transaction at a time.
 * TypeORM's postgres driver assumes a pool of independent connections, so the heart of this
 * module is an arbiter that lends that single session to exactly one TypeORM query runner at a
 * time (FIFO), until the runner releases it. A runner's `START TRANSACTION ... COMMIT` therefore
 * can never interleave with another runner's statements (which is how `typeorm-pglite` loses rows).
 *
 * What TypeORM 1.x actually touches (PostgresDriver.js / PostgresQueryRunner.js):
 * - `new driver.Pool(options)`, `pool.on('error', fn)`, `pool.connect((err, client, release) => ...)`,
 *   `pool.end(cb)`;
 * - `driver.defaults` with an own `parseInt8` setter (only when the `parseInt8` option is used);
 * - `driver.native` must be absent, or TypeORM swaps in pg-native;
 * - `client.query(text, params)` (promise form) and `client.query(text, cb)` (callback form, used
 *   for `CREATE EXTENSION`), `client.on/removeListener('error')`, `client.on('notice')`;
 * - results: `rows`, `rowCount` (→ `affected`), `command` (UPDATE/DELETE return `[rows, count]`).
 *
 * Values look like node-postgres defaults because every value comes back from PGlite as raw text
 * and is parsed with pg's own type parsers (pg-types): int8/numeric → string, int4 → number,
 * timestamps/dates → Date, json/jsonb → parsed, arrays → arrays, interval → PostgresInterval...
 * Parameters are converted exactly like pg's `prepareValue` and then handed to Postgres as text
 * (Buffers as binary), so Postgres itself does the input parsing as it does behind pg.
 */
import { EventEmitter } from 'node:events';
import { types as utilTypes } from 'node:util';
import type { PGlite, QueryOptions, Results, SerializerOptions } from '@electric-sql/pglite';
import pg from 'pg';

// ---------------------------------------------------------------------------------------------
// Public types (a structural subset of node-postgres)
// ---------------------------------------------------------------------------------------------

export type PgTypeParser = (value: string) => unknown;

/** The `getTypeParser` half of pg's `CustomTypesConfig`, accepted per pool and per query. */
export interface PgTypeParserSource {
  getTypeParser(oid: number, format?: 'text' | 'binary'): PgTypeParser;
}

export interface PgFieldDef {
  name: string;
  tableID: number;
  columnID: number;
  dataTypeID: number;
  dataTypeSize: number;
  dataTypeModifier: number;
  format: 'text';
}

export type PgRow = Record<string, unknown>;

export interface PgResult {
  /** First word of the command tag ("SELECT", "UPDATE", "CREATE"...); null for an empty query. */
  command: string | null;
  /** Row count from the command tag; null for commands that report none (like pg). */
  rowCount: number | null;
  /** pg reports the (always 0) oid of INSERT; null otherwise. */
  oid: number | null;
  rows: PgRow[] | unknown[][];
  fields: PgFieldDef[];
  rowAsArray: boolean;
}

export interface PgQueryConfig {
  text: string;
  values?: readonly unknown[];
  rowMode?: 'array' | 'object';
  /** Accepted for compatibility; PGlite always uses the unnamed statement. */
  name?: string;
  types?: PgTypeParserSource;
}

export type PgQueryCallback = (err: Error | null, result?: PgResult | PgResult[]) => void;
/** pg's pool release callback: a truthy argument means "this client is broken". */
export type PgReleaseCallback = (err?: Error | boolean) => void;
export type PgConnectCallback = (err: Error | null, client: PglitePoolClient | undefined, release: PgReleaseCallback) => void;

export interface PglitePoolConfig {
  /** pg's name; TypeORM maps its `connectTimeoutMS` here. 0/undefined = wait forever. */
  connectionTimeoutMillis?: number;
  types?: PgTypeParserSource;
  /** Everything else TypeORM passes (host, user, max, ssl...) is meaningless for PGlite. */
  [option: string]: unknown;
}

export interface PglitePgDriverOptions {
  /**
   * How long `pool.connect()` waits for the session when the pool config sets no
   * `connectionTimeoutMillis` (TypeORM's `connectTimeoutMS`). Default 30 000; 0 = forever (pg's
   * default). Not forever by default because of the one-session deadlock: code that holds a
   * query runner (e.g. inside `dataSource.transaction`) and then queries through *another* runner
   * (`dataSource.query`, a repository not taken from the transaction's EntityManager) waits for
   * itself. On PostgreSQL that borrows a second pooled connection and works; here it would hang
   * forever, so it fails with an explanatory error instead.
   */
  acquireTimeoutMillis?: number;
}

/** Per-driver `defaults`, shaped like `pg.defaults` where TypeORM and pg users look. */
export interface PglitePgDefaults {
  /** Like pg's: true → int8 parsed like int4 (numbers, precision lost beyond 2^53). Default false. */
  parseInt8: boolean;
  /** Like pg: send Dates as UTC ("+00:00") instead of local time with offset. */
  parseInputDatesAsUTC: boolean;
}

export interface PglitePgTypes extends PgTypeParserSource {
  setTypeParser(oid: number, parser: PgTypeParser): void;
  setTypeParser(oid: number, format: 'text', parser: PgTypeParser): void;
  builtins: typeof pg.types.builtins;
}

/** The module object handed to TypeORM as `driver`. */
export interface PglitePgDriver {
  Pool: new (config?: PglitePoolConfig) => PglitePool;
  types: PglitePgTypes;
  defaults: PglitePgDefaults;
  DatabaseError: typeof pg.DatabaseError;
  escapeIdentifier(value: string): string;
  escapeLiteral(value: string): string;
}

// ---------------------------------------------------------------------------------------------
// Session arbiter: one per PGlite instance, shared by every driver/pool built on it
// ---------------------------------------------------------------------------------------------

interface Waiter {
  /** The pool that queued it (so `pool.end()` can fail just its own waiters); null for helpers. */
  owner: object | null;
  onCleanupError: LeaseErrorSink;
  grant: (lease: SessionLease) => void;
  fail: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
  done: boolean;
}

/** Exclusive use of the PGlite session until `end()`; `end()` cleans up, then hands it on. */
interface SessionLease {
  readonly db: PGlite;
  /** Rolls back a transaction left open or aborted, then passes the session on. Idempotent. */
  end(): Promise<void>;
}

type LeaseErrorSink = (error: Error) => void;

class SessionArbiter {
  private busy = false;
  private readonly waiters: Waiter[] = [];
  private closedError: Error | undefined;

  constructor(readonly db: PGlite) {}

  get isBusy(): boolean {
    return this.busy;
  }

  waitingFor(owner: object): number {
    return this.waiters.filter((waiter) => waiter.owner === owner).length;
  }

  /** Marks the session gone: queued and future acquirers fail instead of hanging. */
  close(error: Error): void {
    this.closedError ??= error;
    for (const waiter of this.waiters.splice(0)) this.settle(waiter, () => waiter.fail(error));
  }

  acquire(owner: object | null, timeoutMs: number, onCleanupError: LeaseErrorSink): Promise<SessionLease> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (!this.busy) {
      this.busy = true;
      return Promise.resolve(this.newLease(onCleanupError));
    }
    return new Promise<SessionLease>((resolve, reject) => {
      const waiter: Waiter = { owner, onCleanupError, grant: resolve, fail: reject, timer: undefined, done: false };
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          this.remove(waiter);
          this.settle(waiter, () =>
            waiter.fail(
              new Error(
                `timeout exceeded when trying to connect: the PGlite session stayed busy for ${timeoutMs} ms. ` +
                  'PGlite has a single session; if the caller already holds a query runner (e.g. inside a ' +
                  'transaction), run the query through that runner/EntityManager instead of a new one.',
              ),
            ),
          );
        }, timeoutMs);
      }
      this.waiters.push(waiter);
    });
  }

  /** Fails (and removes) the queued waiters of one pool, e.g. when that pool ends. */
  rejectWaiters(owner: object, error: Error): void {
    for (const waiter of this.waiters.filter((candidate) => candidate.owner === owner)) {
      this.remove(waiter);
      this.settle(waiter, () => waiter.fail(error));
    }
  }

  private remove(waiter: Waiter): void {
    const index = this.waiters.indexOf(waiter);
    if (index !== -1) this.waiters.splice(index, 1);
  }

  private settle(waiter: Waiter, action: () => void): void {
    if (waiter.done) return;
    waiter.done = true;
    if (waiter.timer) clearTimeout(waiter.timer);
    action();
  }

  private newLease(onCleanupError: LeaseErrorSink): SessionLease {
    let ending: Promise<void> | undefined;
    return {
      db: this.db,
      end: () => {
        ending ??= this.finish(onCleanupError);
        return ending;
      },
    };
  }

  private async finish(onCleanupError: LeaseErrorSink): Promise<void> {
    try {
      await rollbackIfInTransaction(this.db);
    } catch (error) {
      // The next holder still gets the session: a failed ROLLBACK means PGlite itself is gone
      // (closed or crashed), and the next caller will get that error from its own query.
      onCleanupError(asError(error));
    }
    this.handOver();
  }

  /** FIFO: the longest-waiting caller gets the session next. */
  private handOver(): void {
    for (let waiter = this.waiters.shift(); waiter; waiter = this.waiters.shift()) {
      if (waiter.done) continue;
      const next = waiter;
      const closedError = this.closedError;
      if (closedError) {
        this.settle(next, () => next.fail(closedError));
        continue;
      }
      this.settle(next, () => next.grant(this.newLease(next.onCleanupError)));
      return;
    }
    this.busy = false;
  }
}

const arbiters = new WeakMap<PGlite, SessionArbiter>();

function arbiterFor(db: PGlite): SessionArbiter {
  let arbiter = arbiters.get(db);
  if (!arbiter) {
    arbiter = new SessionArbiter(db);
    arbiters.set(db, arbiter);
  }
  return arbiter;
}

/**
 * `IsTransactionBlock()` inside PGlite: true for an open *or aborted* transaction block. If a
 * PGlite build lacks it, assume the worst; a ROLLBACK outside a transaction is only a WARNING.
 */
function rollbackIfInTransaction(db: PGlite): Promise<unknown> {
  if (db.closed) return Promise.resolve();
  let inTransaction = true;
  if (typeof db.isInTransaction === 'function') {
    try {
      inTransaction = db.isInTransaction();
    } catch {
      inTransaction = true;
    }
  }
  return inTransaction ? db.exec('ROLLBACK') : Promise.resolve();
}

/**
 * Runs `fn` with exclusive use of the PGlite session, queued behind (and ahead of) TypeORM's
 * query runners. Use it for anything that talks to `db` directly while a DataSource is live
 * (seeding, dumps); calling `db.query` behind the pool's back could land in a runner's transaction.
 * A transaction `fn` leaves open is rolled back afterwards.
 */
export async function withPgliteSession<T>(db: PGlite, fn: (db: PGlite) => Promise<T>): Promise<T> {
  let cleanupError: Error | undefined;
  const lease = await arbiterFor(db).acquire(null, 0, (error) => {
    cleanupError = error;
  });
  let result: T;
  try {
    result = await fn(db);
  } catch (error) {
    await lease.end();
    throw error;
  }
  await lease.end();
  // A failed ROLLBACK only surfaces when `fn` itself succeeded; otherwise `fn`'s error wins.
  if (cleanupError) throw cleanupError;
  return result;
}

/**
 * Closes a PGlite instance after the current holder of its session (and whoever queued before
 * this call) is done, so a runner's cleanup ROLLBACK cannot race the shutdown. Callers queued
 * behind it, or arriving later, get an error instead of hanging. Idempotent. Call it after
 * `dataSource.destroy()`: `pool.end()` never closes `db`, which belongs to whoever opened it.
 * (Plain `db.close()` is fine too when nothing can still be running.)
 */
export async function closePglite(db: PGlite): Promise<void> {
  const arbiter = arbiterFor(db);
  if (db.closed) {
    arbiter.close(new Error('PGlite instance is closed'));
    return;
  }
  const lease = await arbiter.acquire(null, 0, () => undefined).catch(() => undefined);
  try {
    if (!db.closed) await db.close();
  } finally {
    arbiter.close(new Error('PGlite instance is closed'));
    await lease?.end();
  }
}

// ---------------------------------------------------------------------------------------------
// Value conversion
// ---------------------------------------------------------------------------------------------

const identityParser: PgTypeParser = (value) => value;

/** pg-types' parser for an oid (its typings say `any`; at runtime it is always a function). */
function globalPgTypeParser(oid: number, format: 'text' | 'binary'): PgTypeParser {
  const parser: unknown = pg.types.getTypeParser(oid, format);
  return typeof parser === 'function' ? (parser as PgTypeParser) : identityParser;
}

class PgliteTypeOverrides implements PglitePgTypes {
  readonly builtins = pg.types.builtins;
  private readonly text = new Map<number, PgTypeParser>();

  getTypeParser(oid: number, format: 'text' | 'binary' = 'text'): PgTypeParser {
    // Falling back to the global pg-types keeps process-wide tweaks such as
    // `pg.types.setTypeParser(...)` in effect on both backends.
    return (format === 'text' ? this.text.get(oid) : undefined) ?? globalPgTypeParser(oid, format);
  }

  setTypeParser(oid: number, formatOrParser: 'text' | PgTypeParser, parser?: PgTypeParser): void {
    const fn = typeof formatOrParser === 'function' ? formatOrParser : parser;
    if (typeof fn !== 'function') throw new TypeError('setTypeParser needs a parser function');
    this.text.set(oid, fn);
  }

  reset(oid: number): void {
    this.text.delete(oid);
  }

  isOverridden(oid: number): boolean {
    return this.text.has(oid);
  }
}

const INT8_OID = 20;
const INT4_OID = 23;
const INT8_ARRAY_OID = 1016;
const INT4_ARRAY_OID = 1007;

function createDefaults(types: PgliteTypeOverrides): PglitePgDefaults {
  let parseInputDatesAsUTC = false;
  // An object literal so `parseInt8` is an *own* accessor: TypeORM checks
  // `Object.getOwnPropertyDescriptor(defaults, 'parseInt8')?.set` before using it.
  return {
    set parseInt8(enabled: boolean) {
      if (enabled) {
        types.setTypeParser(INT8_OID, globalPgTypeParser(INT4_OID, 'text'));
        types.setTypeParser(INT8_ARRAY_OID, globalPgTypeParser(INT4_ARRAY_OID, 'text'));
      } else {
        types.reset(INT8_OID);
        types.reset(INT8_ARRAY_OID);
      }
    },
    get parseInt8(): boolean {
      // pg's is write-only (reads undefined); reporting the state is more useful and harmless.
      return types.isOverridden(INT8_OID);
    },
    get parseInputDatesAsUTC(): boolean {
      return parseInputDatesAsUTC;
    },
    set parseInputDatesAsUTC(value: boolean) {
      parseInputDatesAsUTC = value;
    },
  };
}

type PreparedValue = string | Buffer | null;

// Port of node-postgres' `prepareValue` (lib/utils.js, pg 8.x) so a parameter reaches Postgres
// as the same text on both backends. Not imported from pg because it is not public API.
function prepareValue(value: unknown, datesAsUtc: boolean, seen: unknown[] = []): PreparedValue {
  if (value === null || value === undefined) return null;
  if (typeof value === 'object') {
    if (Buffer.isBuffer(value)) return value;
    if (ArrayBuffer.isView(value)) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
    if (utilTypes.isDate(value)) return datesAsUtc ? dateToStringUTC(value) : dateToString(value);
    if (Array.isArray(value)) return arrayString(value, datesAsUtc);
    return prepareObject(value, datesAsUtc, seen);
  }
  // number, bigint, boolean, string, symbol...: pg calls `toString()` too.
  // eslint-disable-next-line @typescript-eslint/no-base-to-string -- objects returned above; TS only narrows `unknown` to `{}`, but only primitives and functions get here
  return String(value);
}

function prepareObject(value: object, datesAsUtc: boolean, seen: unknown[]): PreparedValue {
  const toPostgres: unknown = (value as { toPostgres?: unknown }).toPostgres;
  if (typeof toPostgres === 'function') {
    // eslint-disable-next-line @typescript-eslint/no-base-to-string -- same message as pg, which stringifies the object the same way
    if (seen.includes(value)) throw new Error(`circular reference detected while preparing "${String(value)}" for query`);
    seen.push(value);
    const prepare = (inner: unknown): PreparedValue => prepareValue(inner, datesAsUtc);
    return prepareValue((toPostgres as (prepare: (inner: unknown) => PreparedValue) => unknown).call(value, prepare), datesAsUtc, seen);
  }
  return JSON.stringify(value);
}

/** JS array → Postgres array literal, the way pg does it (comma separator, quoted elements). */
function arrayString(values: readonly unknown[], datesAsUtc: boolean): string {
  const parts = values.map((item): string => {
    if (item === null || item === undefined) return 'NULL';
    if (Array.isArray(item)) return arrayString(item, datesAsUtc);
    if (ArrayBuffer.isView(item)) {
      const bytes = Buffer.isBuffer(item) ? item : Buffer.from(item.buffer, item.byteOffset, item.byteLength);
      return '\\\\x' + bytes.toString('hex');
    }
    const prepared = prepareValue(item, datesAsUtc);
    const text = prepared === null ? '' : prepared.toString();
    return '"' + text.replace(/\\/g, '\\\\').replace(/"/g, '\\"') + '"';
  });
  return '{' + parts.join(',') + '}';
}

const pad = (value: number, width = 2): string => String(value).padStart(width, '0');

/** Local time with offset, as pg sends Dates (keeps `timestamp without time zone` = local time). */
function dateToString(date: Date): string {
  let offset = -date.getTimezoneOffset();
  let year = date.getFullYear();
  const isBC = year < 1;
  if (isBC) year = Math.abs(year) + 1;
  let text =
    `${pad(year, 4)}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  if (offset < 0) {
    text += '-';
    offset = -offset;
  } else {
    text += '+';
  }
  text += `${pad(Math.floor(offset / 60))}:${pad(offset % 60)}`;
  return isBC ? `${text} BC` : text;
}

function dateToStringUTC(date: Date): string {
  let year = date.getUTCFullYear();
  const isBC = year < 1;
  if (isBC) year = Math.abs(year) + 1;
  const text =
    `${pad(year, 4)}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())}T` +
    `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}:${pad(date.getUTCSeconds())}.${pad(date.getUTCMilliseconds(), 3)}+00:00`;
  return isBC ? `${text} BC` : text;
}

/**
 * PGlite serializes each parameter with the serializer registered for the type Postgres
 * inferred for it. Our values are already pg-prepared text (or a Buffer, which PGlite's bind
 * sends in binary format exactly like pg), so every serializer must be the identity; a Proxy
 * covers every oid, including types created after startup. PGlite only reads it by key.
 */
const passThroughSerializers: SerializerOptions = new Proxy<SerializerOptions>(
  {},
  {
    // The declared return type is `string`; a Buffer passes through at runtime on purpose.
    get: () => (value: unknown) => value as string,
  },
);

/**
 * Per-query parsers that leave every value as Postgres' text so pg-types can parse it.
 * PGlite merges these over its own (`{...db.parsers, ...options.parsers}`), so they must name
 * every oid PGlite knows; rebuilt only when PGlite learns new (array) types.
 */
function rawTextParsers(db: PGlite, cache: { keyCount: number; parsers: Record<string, PgTypeParser> }): Record<string, PgTypeParser> {
  const keys = Object.keys(db.parsers);
  if (keys.length !== cache.keyCount) {
    const parsers: Record<string, PgTypeParser> = {};
    for (const key of keys) parsers[key] = identityParser;
    cache.parsers = parsers;
    cache.keyCount = keys.length;
  }
  return cache.parsers;
}

const DATABASE_ERROR_FIELDS = [
  'severity',
  'code',
  'detail',
  'hint',
  'position',
  'internalPosition',
  'internalQuery',
  'where',
  'schema',
  'table',
  'column',
  'dataType',
  'constraint',
  'file',
  'line',
  'routine',
] as const;

/**
 * PGlite throws its own bundled DatabaseError class; re-create it as pg's so `err.code`,
 * `err.constraint`... and `instanceof pg.DatabaseError` behave as they do in production.
 */
function toPgError(error: unknown): Error {
  if (!(error instanceof Error)) return new Error(String(error));
  const source = error as Error & Partial<Record<(typeof DATABASE_ERROR_FIELDS)[number], unknown>>;
  if (typeof source.code !== 'string' || typeof source.severity !== 'string') return error;
  const converted = new pg.DatabaseError(error.message, 0, 'error');
  for (const field of DATABASE_ERROR_FIELDS) {
    const value = source[field];
    if (typeof value === 'string') converted[field] = value;
  }
  converted.stack = error.stack;
  return converted;
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

function toPgResult(result: Results, types: PgTypeParserSource, rowAsArray: boolean): PgResult {
  const fields: PgFieldDef[] = result.fields.map((field) => ({
    name: field.name,
    tableID: 0,
    columnID: 0,
    dataTypeID: field.dataTypeID,
    dataTypeSize: -1,
    dataTypeModifier: -1,
    format: 'text',
  }));
  const parsers = fields.map((field) => types.getTypeParser(field.dataTypeID, 'text'));
  const parseCell = (raw: unknown, index: number): unknown => {
    if (raw === null || raw === undefined) return null;
    const parser = parsers.at(index);
    return parser && typeof raw === 'string' ? parser(raw) : raw;
  };
  const rawRows: unknown[] = result.rows;
  const rows = rawRows.map((raw): PgRow | unknown[] => {
    // We always ask PGlite for array rows: object rows would already have merged duplicate names.
    const cells: unknown[] = Array.isArray(raw) ? raw : [];
    if (rowAsArray) return cells.map(parseCell);
    const row: PgRow = {};
    fields.forEach((field, index) => {
      row[field.name] = parseCell(cells[index], index);
    });
    return row;
  });
  const command = result.command ?? null;
  return {
    command,
    rowCount: typeof result.rowCount === 'number' ? result.rowCount : null,
    oid: command === 'INSERT' ? 0 : null,
    // One of the two array types, never mixed; the union is only for the declared shape.
    rows: rows as PgRow[] | unknown[][],
    fields,
    rowAsArray,
  };
}

// ---------------------------------------------------------------------------------------------
// Client (one per lease) and Pool
// ---------------------------------------------------------------------------------------------

interface DriverContext {
  db: PGlite;
  arbiter: SessionArbiter;
  types: PgliteTypeOverrides;
  defaults: PglitePgDefaults;
  parserCache: { keyCount: number; parsers: Record<string, PgTypeParser> };
  acquireTimeoutMillis: number;
}

function isSubmittable(value: unknown): boolean {
  return typeof value === 'object' && value !== null && typeof (value as { submit?: unknown }).submit === 'function';
}

function normalizeQuery(
  textOrConfig: string | PgQueryConfig,
  valuesOrCallback?: readonly unknown[] | PgQueryCallback,
  callback?: PgQueryCallback,
): { config: PgQueryConfig; callback: PgQueryCallback | undefined } {
  const config: PgQueryConfig = typeof textOrConfig === 'string' ? { text: textOrConfig } : { ...textOrConfig };
  let cb = callback;
  if (typeof valuesOrCallback === 'function') cb = valuesOrCallback;
  else if (valuesOrCallback !== undefined) config.values = valuesOrCallback;
  return { config, callback: cb };
}

/** Settles a pg-style call: callback (asynchronously, outside our promise chain) or promise. */
function deliver<T>(promise: Promise<T>, callback: ((err: Error | null, value?: T) => void) | undefined): Promise<T> | undefined {
  if (!callback) return promise;
  promise.then(
    (value) => process.nextTick(callback, null, value),
    (error: unknown) => process.nextTick(callback, asError(error)),
  );
  return undefined;
}

/**
 * The client handed to one holder of the session. A fresh object per lease, so a stale
 * reference kept after `release()` cannot slip statements into the next holder's transaction:
 * it gets an error instead (pg would silently run them on the shared connection).
 */
export class PglitePoolClient extends EventEmitter {
  private released = false;
  private tail: Promise<unknown> = Promise.resolve();
  private endPromise: Promise<void> | undefined;
  private markReleased: () => void = () => undefined;
  private readonly releasedSignal = new Promise<void>((resolve) => {
    this.markReleased = resolve;
  });

  /** @internal */
  constructor(
    private readonly context: DriverContext,
    private readonly lease: SessionLease,
    private readonly poolTypes: PgTypeParserSource,
    private readonly onReleased: (client: PglitePoolClient) => void,
  ) {
    super();
  }

  query(config: PgQueryConfig | string, values?: readonly unknown[]): Promise<PgResult | PgResult[]>;
  query(config: PgQueryConfig | string, callback: PgQueryCallback): undefined;
  query(config: PgQueryConfig | string, values: readonly unknown[] | undefined, callback: PgQueryCallback): undefined;
  query(
    textOrConfig: PgQueryConfig | string,
    valuesOrCallback?: readonly unknown[] | PgQueryCallback,
    callback?: PgQueryCallback,
  ): Promise<PgResult | PgResult[]> | undefined {
    if (isSubmittable(textOrConfig)) {
      // e.g. pg-query-stream / pg-cursor: they drive pg's wire connection, which PGlite has not.
      throw new TypeError('The PGlite driver does not support submittable queries (streams, cursors).');
    }
    const { config, callback: cb } = normalizeQuery(textOrConfig, valuesOrCallback, callback);
    let run: Promise<PgResult | PgResult[]>;
    if (this.released) {
      run = Promise.reject(new Error('This PGlite client was released to the pool and can no longer run queries.'));
    } else {
      // pg runs a client's queries strictly in order; keep that even for un-awaited calls.
      run = this.tail.then(() => this.execute(config));
      this.tail = run.catch(() => undefined);
    }
    return deliver(run, cb);
  }

  /** pg's `PoolClient#release`; TypeORM uses the release callback, which is the same thing. */
  release(err?: Error | boolean): void {
    void err; // pg destroys a client released with an error; here the session is cleaned instead.
    void this.end();
  }

  escapeIdentifier(value: string): string {
    return pg.escapeIdentifier(value);
  }

  escapeLiteral(value: string): string {
    return pg.escapeLiteral(value);
  }

  /** @internal Releases once; resolves after cleanup and hand-over. */
  end(): Promise<void> {
    if (!this.endPromise) {
      this.released = true;
      this.endPromise = this.tail
        .then(() => this.lease.end())
        .finally(() => {
          this.onReleased(this);
          this.markReleased();
        });
    }
    return this.endPromise;
  }

  /** @internal Resolves once the holder has released this client and the session moved on. */
  whenReleased(): Promise<void> {
    return this.releasedSignal;
  }

  private async execute(config: PgQueryConfig): Promise<PgResult | PgResult[]> {
    const { db } = this.context;
    const types = config.types ?? this.poolTypes;
    const rowAsArray = config.rowMode === 'array';
    const datesAsUtc = this.context.defaults.parseInputDatesAsUTC;
    const values = (config.values ?? []).map((value) => prepareValue(value, datesAsUtc));
    const options: QueryOptions = {
      rowMode: 'array',
      parsers: rawTextParsers(db, this.context.parserCache),
      serializers: passThroughSerializers,
      onNotice: (notice) => {
        if (this.listenerCount('notice') > 0) this.emit('notice', notice);
      },
    };
    try {
      if (values.length === 0) {
        // Like pg: no parameters → simple query protocol, which also runs several statements
        // (migrations do that) and answers with one result per statement.
        const results = await db.exec(config.text, options);
        const mapped = results.map((result) => toPgResult(result, types, rowAsArray));
        const [first] = mapped;
        return mapped.length === 1 && first ? first : mapped;
      }
      return toPgResult(await db.query(config.text, values, options), types, rowAsArray);
    } catch (error) {
      throw toPgError(error);
    }
  }
}

/**
 * pg-pool look-alike over the shared session. All pools on the same PGlite instance (TypeORM
 * creates a new one after each `initialize()`, and several DataSources may share a `db`) queue
 * on the same arbiter, so exclusivity holds across them too.
 */
export class PglitePool extends EventEmitter {
  readonly options: PglitePoolConfig;
  private endingFlag = false;
  private endedFlag = false;
  private readonly active = new Set<PglitePoolClient>();
  private readonly types: PgTypeParserSource;

  /** @internal */
  constructor(
    private readonly context: DriverContext,
    config: PglitePoolConfig = {},
  ) {
    super();
    this.options = { ...config };
    this.types = config.types ?? context.types;
  }

  get ending(): boolean {
    return this.endingFlag;
  }

  get ended(): boolean {
    return this.endedFlag;
  }

  /** One client exists per pool (the shared session); none once ended. */
  get totalCount(): number {
    return this.endedFlag ? 0 : 1;
  }

  /** 1 while nobody — through any pool on this PGlite — holds the session. */
  get idleCount(): number {
    return this.endedFlag || this.context.arbiter.isBusy ? 0 : 1;
  }

  /** Callers of this pool queued for the session. */
  get waitingCount(): number {
    return this.context.arbiter.waitingFor(this);
  }

  get expiredCount(): number {
    return 0;
  }

  connect(): Promise<PglitePoolClient>;
  connect(callback: PgConnectCallback): undefined;
  connect(callback?: PgConnectCallback): Promise<PglitePoolClient> | undefined {
    const acquired = this.acquire();
    if (!callback) return acquired;
    acquired.then(
      (client) => process.nextTick(callback, null, client, (err?: Error | boolean) => client.release(err)),
      (error: unknown) => process.nextTick(callback, asError(error), undefined, () => undefined),
    );
    return undefined;
  }

  /** pg's `pool.query`: borrow the session for one statement. */
  query(config: PgQueryConfig | string, values?: readonly unknown[]): Promise<PgResult | PgResult[]>;
  query(config: PgQueryConfig | string, callback: PgQueryCallback): undefined;
  query(config: PgQueryConfig | string, values: readonly unknown[] | undefined, callback: PgQueryCallback): undefined;
  query(
    textOrConfig: PgQueryConfig | string,
    valuesOrCallback?: readonly unknown[] | PgQueryCallback,
    callback?: PgQueryCallback,
  ): Promise<PgResult | PgResult[]> | undefined {
    const { config, callback: cb } = normalizeQuery(textOrConfig, valuesOrCallback, callback);
    const run = this.acquire().then(async (client) => {
      try {
        return await client.query(config);
      } finally {
        await client.end();
      }
    });
    return deliver(run, cb);
  }

  end(): Promise<void>;
  end(callback: (err?: Error) => void): undefined;
  end(callback?: (err?: Error) => void): Promise<void> | undefined {
    const run = this.shutDown();
    if (!callback) return run;
    run.then(
      () => process.nextTick(callback),
      (error: unknown) => process.nextTick(callback, asError(error)),
    );
    return undefined;
  }

  private async shutDown(): Promise<void> {
    if (this.endingFlag) throw new Error('Called end on pool more than once');
    this.endingFlag = true;
    this.context.arbiter.rejectWaiters(this, new Error('Cannot use a pool after calling end on the pool'));
    // Like pg-pool: resolves once clients still checked out have been released by their holders
    // (and, here, cleaned up). TypeORM releases all its query runners before calling end().
    await Promise.all([...this.active].map((client) => client.whenReleased()));
    this.endedFlag = true;
  }

  private async acquire(): Promise<PglitePoolClient> {
    if (this.endingFlag) throw new Error('Cannot use a pool after calling end on the pool');
    const timeout = this.options.connectionTimeoutMillis;
    const timeoutMs = typeof timeout === 'number' && timeout > 0 ? timeout : this.context.acquireTimeoutMillis;
    const lease = await this.context.arbiter.acquire(this, timeoutMs, (error) => this.reportError(error));
    const client = new PglitePoolClient(this.context, lease, this.types, (released) => this.active.delete(released));
    this.active.add(client);
    return client;
  }

  /** Like pg-pool's idle-client errors, but never an unhandled 'error' event (that would crash). */
  private reportError(error: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', error);
    else process.emitWarning(`PGlite session cleanup failed: ${error.message}`, 'PglitePoolWarning');
  }
}

const DEFAULT_ACQUIRE_TIMEOUT_MS = 30_000;

/**
 * Builds the `driver` module for `new DataSource({ type: 'postgres', driver: createPglitePgDriver(db) })`.
 * Each call gets its own `types`/`defaults` (so TypeORM's `parseInt8` stays local), while the
 * session lock is per `db`, shared by every driver built on it.
 */
export function createPglitePgDriver(db: PGlite, options: PglitePgDriverOptions = {}): PglitePgDriver {
  const types = new PgliteTypeOverrides();
  const context: DriverContext = {
    db,
    arbiter: arbiterFor(db),
    types,
    defaults: createDefaults(types),
    parserCache: { keyCount: -1, parsers: {} },
    acquireTimeoutMillis: options.acquireTimeoutMillis ?? DEFAULT_ACQUIRE_TIMEOUT_MS,
  };
  class Pool extends PglitePool {
    constructor(config?: PglitePoolConfig) {
      super(context, config);
    }
  }
  return {
    Pool,
    types,
    defaults: context.defaults,
    DatabaseError: pg.DatabaseError,
    escapeIdentifier: (value) => pg.escapeIdentifier(value),
    escapeLiteral: (value) => pg.escapeLiteral(value),
  };
}
