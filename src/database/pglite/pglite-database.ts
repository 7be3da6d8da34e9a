/**
 * Opening PGlite instances, and migrated templates so tests skip initdb.
 *
 * Timings measured in the dev container (2 vCPUs, Node 24, PGlite 0.5.17; ranges over several
 * runs, the high ends while other jobs shared the machine):
 * - first start in `memory://` (runs initdb):                         2.7–4.9 s
 * - first start on an empty directory (initdb, then copied to disk):  2.7–4.0 s
 * - reopen an existing directory (no initdb):                         0.23–0.35 s
 * - `dumpPgliteTemplate` (CHECKPOINT + tar; 20 tables):   'none' 0.13–0.18 s, 41 MB
 *                                                         'gzip' 0.67–0.77 s, 4.7 MB
 * - `openPglite({ dataDir: 'memory://', loadDataDir })`:  'none' 0.33–0.63 s
 *                                                         'gzip' 0.48–0.70 s
 * - then `new DataSource(...).initialize()` on it:                    < 10 ms
 * So a test run should initdb + migrate once, dump, and load the template per test file: 5–10×
 * cheaper than initdb, and the migrations have already run.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PGlite } from '@electric-sql/pglite';
import { withPgliteSession } from './pglite-pg-driver.js';

export interface OpenPgliteOptions {
  /** A directory (created when missing; data persists across restarts) or `'memory://'`. */
  dataDir: string;
  /**
   * A tarball from `dumpPgliteTemplate` to start from instead of running initdb. For a directory
   * that already holds a database it is ignored: the existing data wins, so a dev server can pass
   * its template on every start and only the very first start uses it.
   */
  loadDataDir?: Blob | File;
}

export interface DumpPgliteTemplateOptions {
  /**
   * 'none' (default) is ~5× faster to dump and faster to load; fine for a template kept in memory
   * or in a temp file. 'gzip' is ~10× smaller, for templates that are stored or shipped.
   */
  compression?: 'none' | 'gzip';
}

/**
 * PGlite's own start parameters plus a smaller buffer pool. The data directory's postgresql.conf
 * (written by initdb) asks for shared_buffers=128MB, which sits in the WASM heap of the gateway's
 * own process and never shrinks; an embedded database is one developer's, and 16 MB took the
 * gateway's RSS down by 60-140 MB at the same CPU per request (docs/operations.md "Memory").
 */
const START_PARAMS = [...PGlite.defaultStartParams, '-c', 'shared_buffers=16MB'];

/** Opens (or creates) a PGlite database; its owner must close it (see `closePglite`). */
export async function openPglite(opts: OpenPgliteOptions): Promise<PGlite> {
  if (opts.dataDir.startsWith('memory://')) {
    return PGlite.create('memory://', { startParams: START_PARAMS, ...(opts.loadDataDir ? { loadDataDir: opts.loadDataDir } : {}) });
  }
  const dir = resolve(opts.dataDir.startsWith('file:') ? fileURLToPath(opts.dataDir) : opts.dataDir);
  // PGlite's NodeFS only creates the last path segment itself.
  mkdirSync(dir, { recursive: true });
  const releaseLock = lockDataDir(dir);
  try {
    const load = opts.loadDataDir && !existsSync(join(dir, 'PG_VERSION')) ? opts.loadDataDir : undefined;
    const db = await PGlite.create(dir, { startParams: START_PARAMS, ...(load ? { loadDataDir: load } : {}) });
    // A template dumped from a directory holds that directory's lock file, with its owner's pid,
    // and loading it has just written that over ours.
    if (load) writeFileSync(lockPathOf(dir), String(process.pid));
    holdLockUntilClosed(db, releaseLock);
    return db;
  } catch (error) {
    releaseLock();
    throw error;
  }
}

/**
 * Snapshot of the whole data directory, to pass as `loadDataDir` later. Runs a CHECKPOINT first
 * so the copy needs no WAL replay, and takes the session lock so it never captures the middle of
 * a query runner's transaction.
 */
export async function dumpPgliteTemplate(db: PGlite, opts: DumpPgliteTemplateOptions = {}): Promise<Blob> {
  return withPgliteSession(db, async (session) => {
    await session.exec('CHECKPOINT');
    return session.dumpDataDir(opts.compression ?? 'none');
  });
}

// ---------------------------------------------------------------------------------------------
// Data-directory lock
// ---------------------------------------------------------------------------------------------
// PGlite happily opens a directory another PGlite instance already has open (its postmaster.pid
// holds a fake pid), and two single-user backends writing the same files corrupt the database.
// The API and the worker role (`start:worker`) would do exactly that with the default data dir, so
// a `gatehouse.lock` file records the owning pid: a live other process means refusal; a dead one
// (or our own pid left behind, e.g. by a container restart reusing pid 1) means a stale lock.
//
// The lock lives inside the directory, the one place the process is sure to own: the image makes
// only /app/data writable, not /app beside it. PostgreSQL and PGlite ignore the extra file (initdb
// included), and it travels in dumps like any other. Earlier versions kept `<dir>.lock` beside the
// directory: one of those still running is respected, a stale one removed where we may.
// (test/integration/pglite-data-dir.int-spec.ts)

const LOCK_FILE = 'gatehouse.lock';
const locksHeld = new Set<string>();
let exitHookInstalled = false;

function lockPathOf(dir: string): string {
  return join(dir, LOCK_FILE);
}

function lockDataDir(dir: string): () => void {
  const lockPath = lockPathOf(dir);
  if (locksHeld.has(lockPath)) {
    throw new Error(`PGlite data directory ${dir} is already open in this process; close it first.`);
  }
  const legacyPath = `${dir}.lock`;
  const legacyOwner = lockOwner(legacyPath);
  if (legacyOwner !== undefined) {
    if (isOtherLiveProcess(legacyOwner)) throw inUse(dir, legacyOwner, legacyPath);
    try {
      rmSync(legacyPath, { force: true });
    } catch {
      // A parent we may not write to (the image's /app): the stale file stays, and stays harmless.
    }
  }
  try {
    writeFileSync(lockPath, String(process.pid), { flag: 'wx' });
  } catch (error) {
    if (!isErrnoException(error) || error.code !== 'EEXIST') throw error;
    const owner = lockOwner(lockPath);
    if (owner !== undefined && isOtherLiveProcess(owner)) throw inUse(dir, owner, lockPath, error);
    writeFileSync(lockPath, String(process.pid));
  }
  locksHeld.add(lockPath);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    // Synchronous cleanup for processes that exit without closing their database.
    process.once('exit', () => {
      for (const path of locksHeld) rmSync(path, { force: true });
    });
  }
  let released = false;
  return () => {
    if (released) return;
    released = true;
    locksHeld.delete(lockPath);
    rmSync(lockPath, { force: true });
  };
}

/**
 * Ties the lock to the instance's lifetime. Owners call `db.close()` directly (and
 * `Symbol.asyncDispose` calls it too), so wrapping that one instance method is the only hook.
 */
function holdLockUntilClosed(db: PGlite, releaseLock: () => void): void {
  const close = db.close.bind(db);
  db.close = async () => {
    try {
      await close();
    } finally {
      releaseLock();
    }
  };
}

/** The pid a lock file names; undefined when there is no such file (or no pid in it). */
function lockOwner(path: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return undefined;
    throw error;
  }
  const pid = Number.parseInt(text.trim(), 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

function isOtherLiveProcess(pid: number): boolean {
  return pid !== process.pid && isProcessAlive(pid);
}

function inUse(dir: string, owner: number, lockPath: string, cause?: unknown): Error {
  return new Error(
    `PGlite data directory ${dir} is in use by process ${owner} (lock file ${lockPath}). ` +
      'An embedded database belongs to one process; use PostgreSQL to share it.',
    cause === undefined ? undefined : { cause },
  );
}

function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: it exists but belongs to someone else.
    return isErrnoException(error) && error.code === 'EPERM';
  }
}

function isErrnoException(error: unknown): error is NodeJS.ErrnoException {
  return error instanceof Error && 'code' in error;
}
