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
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PGlite } from '@electric-sql/pglite';
import { withPgliteSession } from './pglite-pg-driver.js';

export interface OpenPgliteOptions {
  /**
   * A directory (created when missing; data persists across restarts) or `'memory://'`. A directory
   * that holds files but no database is refused (see `assertDataDir`).
   */
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
  // Before the lock, whose file would be the first thing written among someone else's. A lock
  // already there makes the directory ours: its owner may be midway through initdb, and only the
  // lock can tell whether it lives.
  if (!existsSync(lockPathOf(dir))) assertDataDir(dir);
  const lock = await lockDataDir(dir);
  try {
    // Again under the lock: what a first start that died mid-initdb left is no database either.
    assertDataDir(dir);
    const load = opts.loadDataDir && !existsSync(join(dir, 'PG_VERSION')) ? opts.loadDataDir : undefined;
    const db = await PGlite.create(dir, { startParams: START_PARAMS, ...(load ? { loadDataDir: load } : {}) });
    // A template dumped from a directory holds that directory's lock file, with its owner's token,
    // and loading it has just written that over ours.
    if (load) lock.reclaim();
    holdLockUntilClosed(db, lock);
    return db;
  } catch (error) {
    lock.release();
    throw error;
  }
}

/**
 * Entries an empty directory may still hold: a volume's root (`lost+found`), a placeholder kept in
 * a repository, Finder's. Our own lock file (and a takeover's temp file) is passed over too.
 */
const IGNORED_ENTRIES = new Set(['lost+found', '.gitkeep', '.keep', '.DS_Store']);

/**
 * Refuses a directory that holds files but no database (no PG_VERSION): PGlite's initdb would
 * spread some twenty PostgreSQL entries (base/, global/, pg_wal/, postgresql.conf...) among them
 * and write over any that share those names. A DATA_DIR typo (`.` in a repository, `$HOME`, a
 * volume of other files) ends here. PostgreSQL's own initdb refuses the same way.
 * (test/integration/pglite-data-dir.int-spec.ts)
 */
function assertDataDir(dir: string): void {
  if (existsSync(join(dir, 'PG_VERSION'))) return;
  const foreign = readdirSync(dir).filter((entry) => !IGNORED_ENTRIES.has(entry) && entry !== LOCK_FILE && !entry.startsWith(`${LOCK_FILE}.`));
  if (foreign.length === 0) return;
  const shown = foreign.slice(0, 3).join(', ') + (foreign.length > 3 ? `, … (${foreign.length} entries)` : '');
  throw new Error(
    `PGlite data directory ${dir} is not empty and holds no database (no PG_VERSION; it has ${shown}). ` +
      'Point DATA_DIR at an empty or new directory; if an earlier first start was interrupted here, empty this one.',
  );
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
// a `gatehouse.lock` file names its owner, and the owner touches it every HEARTBEAT_MS for as long
// as it has the directory open.
//
// A pid alone cannot tell whether the owner lives: two containers sharing a volume have pid
// namespaces of their own, where the other's pid is nobody, or our own (pid 1). So the file also
// names the owner's pid namespace (the kernel's boot id and the namespace's inode), and the pid is
// only believed inside that same namespace: there a live pid is refusal at once, and a dead one (or
// our own, left by an earlier process) a stale lock taken at once. Anywhere else the heartbeat
// decides: a lock touched within STALE_MS is watched until it is touched again (refusal) or has
// gone STALE_MS untouched (taken over), which is what a container restarted after a crash sees.
// A lock from an earlier version (a pid only, no heartbeat) is refused while its pid lives here,
// as those versions did, and otherwise judged by its age.
//
// A takeover renames a file of ours over the stale lock, then after SETTLE_MS reads it back: of two
// processes taking over at once, the later rename wins and the other, seeing a token not its own,
// backs off. Release removes the file only while it still holds our token.
//
// The lock lives inside the directory, the one place the process is sure to own: the image makes
// only /app/data writable, not /app beside it. PostgreSQL and PGlite ignore the extra file (initdb
// included), and it travels in dumps like any other. Earlier versions kept `<dir>.lock` beside the
// directory: one of those still running is respected, a stale one removed where we may.
// (test/integration/pglite-data-dir.int-spec.ts, pglite-data-dir-lock.int-spec.ts,
// test/e2e/pglite-lock-namespaces.e2e-spec.ts)

const LOCK_FILE = 'gatehouse.lock';
const HEARTBEAT_MS = 2_000;
/**
 * Much more than a few heartbeats: the timer runs on the event loop, which PGlite's WASM blocks
 * for as long as one call lasts (initdb alone took up to 4.9 s, see the top of this file), and a
 * lock taken from a live owner costs the database. A restart after a crash waits this long.
 */
const STALE_MS = 15_000;
/** Far longer than the few synchronous calls between a racing taker's last look and its rename. */
const SETTLE_MS = 500;
const WATCH_POLL_MS = 250;
/** Lock paths this process holds, or is taking: its own pid in a file is then no leftover. */
const locksClaimed = new Set<string>();
const locksHeld = new Map<string, DataDirLock>();
let exitHookInstalled = false;

export interface DataDirLockOptions {
  heartbeatMs?: number;
  staleMs?: number;
  settleMs?: number;
  /** Told once when startup waits for a lock to go stale; a process warning by default. */
  onWait?: (message: string) => void;
}

export interface DataDirLock {
  /** Writes our lock file again, after a template load has written the dumper's over it. */
  reclaim(): void;
  /** Stops the heartbeat and removes the file if it is still ours. */
  release(): void;
}

interface LockOwner {
  pid?: number;
  host?: string;
  /** Undefined in an earlier version's file (its pid only). */
  scope?: string;
  token?: string;
}

interface LockSeen {
  text: string;
  mtimeMs: number;
  owner: LockOwner;
}

function lockPathOf(dir: string): string {
  return join(dir, LOCK_FILE);
}

/** Takes `dir`'s lock, waiting (at most about 2 × STALE_MS) for one a dead owner left to go stale. */
export async function lockDataDir(dir: string, options: DataDirLockOptions = {}): Promise<DataDirLock> {
  const lockPath = lockPathOf(dir);
  if (locksClaimed.has(lockPath)) {
    throw new Error(`PGlite data directory ${dir} is already open in this process; close it first.`);
  }
  const legacyPath = `${dir}.lock`;
  const legacyOwner = lockOwnerPid(legacyPath);
  if (legacyOwner !== undefined) {
    if (isOtherLiveProcess(legacyOwner)) throw inUse(dir, { pid: legacyOwner }, legacyPath);
    try {
      rmSync(legacyPath, { force: true });
    } catch {
      // A parent we may not write to (the image's /app): the stale file stays, and stays harmless.
    }
  }
  const staleMs = options.staleMs ?? STALE_MS;
  const me: LockOwner = { pid: process.pid, host: hostname(), scope: pidNamespaceScope(), token: randomBytes(16).toString('hex') };
  const content = formatLock(me);
  locksClaimed.add(lockPath);
  try {
    await acquireLock(dir, lockPath, content, me, {
      staleMs,
      settleMs: options.settleMs ?? SETTLE_MS,
      onWait: options.onWait ?? ((message) => process.emitWarning(message, 'GatehouseDataDirLock')),
    });
  } catch (error) {
    locksClaimed.delete(lockPath);
    throw error;
  }
  const heartbeat = setInterval(() => {
    const now = new Date();
    try {
      utimesSync(lockPath, now, now);
    } catch {
      // Gone (removed by hand, or a release racing this tick): nothing left to keep fresh.
    }
  }, options.heartbeatMs ?? HEARTBEAT_MS);
  heartbeat.unref();
  let released = false;
  const lock: DataDirLock = {
    reclaim: () => writeFileSync(lockPath, content),
    release: () => {
      if (released) return;
      released = true;
      clearInterval(heartbeat);
      locksHeld.delete(lockPath);
      locksClaimed.delete(lockPath);
      try {
        // A process that took the directory over (ours went stale while this one was frozen)
        // keeps its lock.
        if (readLock(lockPath)?.owner.token === me.token) rmSync(lockPath, { force: true });
      } catch {
        // Unreadable now: left to go stale, which costs the next start STALE_MS at most.
      }
    },
  };
  locksHeld.set(lockPath, lock);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    // Synchronous cleanup for processes that exit without closing their database.
    process.once('exit', () => {
      for (const held of locksHeld.values()) held.release();
    });
  }
  return lock;
}

async function acquireLock(
  dir: string,
  lockPath: string,
  content: string,
  me: LockOwner,
  opts: { staleMs: number; settleMs: number; onWait(message: string): void },
): Promise<void> {
  // Bounds the case of locks that keep changing hands under us: each round is one owner's.
  const giveUpAt = Date.now() + 2 * opts.staleMs + opts.settleMs;
  let waitTold = false;
  for (;;) {
    try {
      writeFileSync(lockPath, content, { flag: 'wx' });
      return;
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'EEXIST') throw error;
    }
    let seen = readLock(lockPath);
    if (seen === undefined) continue;
    const verdict = judgeOwner(seen.owner, me);
    if (verdict === 'alive') throw inUse(dir, seen.owner, lockPath);
    if (verdict === 'unknown') {
      const age = Date.now() - seen.mtimeMs;
      if (age < opts.staleMs) {
        if (!waitTold) {
          waitTold = true;
          opts.onWait(
            `PGlite data directory ${dir}: waiting up to ${Math.ceil((opts.staleMs - Math.max(0, age)) / 1000)} s for the lock of process ` +
              `${seen.owner.pid ?? '?'}${seen.owner.host === undefined ? '' : ` on ${seen.owner.host}`} to go stale (lock file ${lockPath}).`,
          );
        }
        // A future mtime (another machine's clock) counts as just touched.
        const watched = await watchLock(lockPath, seen, opts.staleMs - Math.max(0, age));
        if (watched === 'touched') throw inUse(dir, seen.owner, lockPath);
        if (watched === 'replaced') {
          if (Date.now() > giveUpAt) throw inUse(dir, readLock(lockPath)?.owner ?? seen.owner, lockPath);
          continue;
        }
      }
    }
    const won = await takeOver(lockPath, content, seen, me, opts.settleMs);
    if (won) return;
    seen = readLock(lockPath) ?? seen;
    if (Date.now() > giveUpAt) throw inUse(dir, seen.owner, lockPath);
  }
}

/**
 * 'alive' and 'dead' only where the pid means something: in the owner's own pid namespace. A boot
 * id and a namespace inode that match ours are that namespace, or one that died (and its owner
 * with it) before ours reused the number.
 */
function judgeOwner(owner: LockOwner, me: LockOwner): 'alive' | 'dead' | 'unknown' {
  if (owner.pid === undefined) return 'unknown';
  if (owner.scope !== undefined && owner.scope === me.scope) {
    return owner.pid === process.pid || !isProcessAlive(owner.pid) ? 'dead' : 'alive';
  }
  // An earlier version's file: its pid is all there is, refused while it lives as those versions did.
  if (owner.scope === undefined && isOtherLiveProcess(owner.pid)) return 'alive';
  return 'unknown';
}

/** Until the lock is touched, replaced or gone, or has stayed as it is for `quietMs`. */
async function watchLock(lockPath: string, seen: LockSeen, quietMs: number): Promise<'touched' | 'replaced' | 'quiet'> {
  const until = Date.now() + quietMs;
  for (let left = quietMs; left > 0; left = until - Date.now()) {
    await sleep(Math.min(WATCH_POLL_MS, left));
    const now = readLock(lockPath);
    if (now === undefined || now.text !== seen.text) return 'replaced';
    if (now.mtimeMs !== seen.mtimeMs) return 'touched';
  }
  return 'quiet';
}

/**
 * Renames our file over the stale lock `seen`, unless it changed since, and keeps it only if it is
 * still ours after `settleMs`. A rival that looked at the stale lock before our rename renames
 * right after its own last look (a few synchronous calls), so within `settleMs` of ours: whichever
 * rename came last holds, and both read-backs see it. Only a rival stopped between those calls for
 * longer (SIGSTOP, a frozen VM) could win after our read-back.
 */
async function takeOver(lockPath: string, content: string, seen: LockSeen, me: LockOwner, settleMs: number): Promise<boolean> {
  const temp = `${lockPath}.${me.token}`;
  writeFileSync(temp, content);
  try {
    const now = readLock(lockPath);
    if (now === undefined || now.text !== seen.text || now.mtimeMs !== seen.mtimeMs) return false;
    renameSync(temp, lockPath);
  } finally {
    rmSync(temp, { force: true });
  }
  await sleep(settleMs);
  return readLock(lockPath)?.owner.token === me.token;
}

/**
 * Identifies the pid namespace the pids in our file belong to. Linux: the boot (two machines, or
 * one before and after a reboot, differ) and the namespace's inode. Elsewhere there are no pid
 * namespaces and the host name stands for the machine. Undefined when /proc will not say: then no
 * pid is believed, and only the heartbeat counts.
 */
function pidNamespaceScope(): string | undefined {
  if (process.platform !== 'linux') return `host:${hostname()}`;
  try {
    const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    return `linux:${boot}:${readlinkSync('/proc/self/ns/pid')}`;
  } catch {
    return undefined;
  }
}

/** The pid on the first line, where earlier versions (which parse the whole file as one) find it. */
function formatLock(owner: LockOwner): string {
  return `${owner.pid}\nhost=${owner.host}\nscope=${owner.scope ?? ''}\ntoken=${owner.token}\n`;
}

function parseLock(text: string): LockOwner {
  const [first = '', ...rest] = text.split('\n');
  const pid = Number.parseInt(first.trim(), 10);
  const owner: LockOwner = Number.isInteger(pid) && pid > 0 ? { pid } : {};
  for (const line of rest) {
    const at = line.indexOf('=');
    const value = line.slice(at + 1).trim();
    if (at < 0 || value === '') continue;
    const key = line.slice(0, at);
    if (key === 'host' || key === 'scope' || key === 'token') owner[key] = value;
  }
  return owner;
}

/** Undefined when there is no lock file. */
function readLock(path: string): LockSeen | undefined {
  try {
    const text = readFileSync(path, 'utf8');
    return { text, mtimeMs: statSync(path).mtimeMs, owner: parseLock(text) };
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return undefined;
    throw error;
  }
}

/** The pid an earlier version's lock file (`<dir>.lock`, a pid only) names. */
function lockOwnerPid(path: string): number | undefined {
  return readLock(path)?.owner.pid;
}

function isOtherLiveProcess(pid: number): boolean {
  return pid !== process.pid && isProcessAlive(pid);
}

function inUse(dir: string, owner: LockOwner, lockPath: string): Error {
  const elsewhere = owner.scope !== undefined && owner.scope !== pidNamespaceScope();
  return new Error(
    `PGlite data directory ${dir} is in use by process ${owner.pid ?? '?'}` +
      `${elsewhere ? ` of ${owner.host ?? 'another host'} (another container or machine)` : ''} (lock file ${lockPath}). ` +
      'An embedded database belongs to one process; use PostgreSQL to share it.',
  );
}

/**
 * Ties the lock to the instance's lifetime. Owners call `db.close()` directly (and
 * `Symbol.asyncDispose` calls it too), so wrapping that one instance method is the only hook.
 */
function holdLockUntilClosed(db: PGlite, lock: DataDirLock): void {
  const close = db.close.bind(db);
  db.close = async () => {
    try {
      await close();
    } finally {
      lock.release();
    }
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
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
