import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as esbuild from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lockDataDir } from '../../src/database/pglite/pglite-database.js';
import { pollUntil } from '../support/gateway.js';
import { exitedPid, otherLiveProcess } from '../support/processes.js';

const root = join(import.meta.dirname, '..', '..');
/** Short enough for tests; the gateway's own are 2 s, 15 s and 0.5 s. */
const TIMING = { heartbeatMs: 100, staleMs: 1500, settleMs: 200 };
/** Another pid namespace: a container beside ours on the same volume. */
const ELSEWHERE = 'linux:00000000-0000-0000-0000-000000000000:pid:[1]';

/**
 * `gatehouse.lock` decides by pid only within the owner's own pid namespace, and by the owner's
 * heartbeat everywhere else (src/database/pglite/pglite-database.ts). The locks of other owners
 * are written here by hand, in the file's format; test/e2e/pglite-lock-namespaces.e2e-spec.ts runs
 * two gateways in two pid namespaces.
 */
describe('the data-dir lock (gatehouse.lock)', () => {
  let base: string;
  let next = 0;
  let ourScope: string;

  beforeAll(async () => {
    base = mkdtempSync(join(tmpdir(), 'gatehouse-lock-'));
    const dir = newDir();
    const lock = await lockDataDir(dir, TIMING);
    ourScope = parse(readFileSync(lockPath(dir), 'utf8')).scope;
    lock.release();
  });
  afterAll(() => {
    rmSync(base, { recursive: true, force: true });
  });

  function newDir(): string {
    const dir = join(base, `dir-${++next}`);
    mkdirSync(dir);
    return dir;
  }

  it('writes the pid first, for earlier versions, then host, pid namespace and token; removes it on release', async () => {
    const dir = newDir();
    const lock = await lockDataDir(dir, TIMING);
    const text = readFileSync(lockPath(dir), 'utf8');
    expect(text).toMatch(new RegExp(`^${process.pid}\\nhost=.+\\nscope=linux:[0-9a-f-]+:pid:\\[\\d+\\]\\ntoken=[0-9a-f]{32}\\n$`));
    lock.release();
    expect(() => statSync(lockPath(dir))).toThrow(/ENOENT/);
  });

  it('keeps its lock fresh while it holds the directory', async () => {
    const dir = newDir();
    const lock = await lockDataDir(dir, TIMING);
    try {
      const past = new Date(Date.now() - 60_000);
      utimesSync(lockPath(dir), past, past);
      await pollUntil(() => expect(Date.now() - statSync(lockPath(dir)).mtimeMs).toBeLessThan(1000), 2000, 50);
    } finally {
      lock.release();
    }
  });

  it('refuses a fresh lock of another pid namespace whose owner keeps it fresh, whatever its pid (dead here, or ours)', async () => {
    for (const pid of [await exitedPid(), process.pid]) {
      const dir = newDir();
      writeLock(dir, { pid, scope: ELSEWHERE });
      const beat = setInterval(() => touch(lockPath(dir), Date.now()), TIMING.heartbeatMs);
      try {
        await expect(lockDataDir(dir, { ...TIMING, onWait: () => {} })).rejects.toThrow(`in use by process ${pid} of elsewhere (another container or machine)`);
      } finally {
        clearInterval(beat);
      }
      expect(parse(readFileSync(lockPath(dir), 'utf8')).token).toBe('theirs');
    }
  });

  it('waits for a fresh lock of another pid namespace that nobody touches (a crashed container), then takes it over', async () => {
    const dir = newDir();
    writeLock(dir, { pid: 1, scope: ELSEWHERE });
    const told: string[] = [];
    const began = Date.now();
    const lock = await lockDataDir(dir, { ...TIMING, onWait: (message) => told.push(message) });
    try {
      expect(Date.now() - began).toBeGreaterThanOrEqual(TIMING.staleMs - 200);
      expect(told).toHaveLength(1);
      expect(told[0]).toContain('to go stale');
      expect(readFileSync(lockPath(dir), 'utf8').split('\n')[0]).toBe(String(process.pid));
    } finally {
      lock.release();
    }
  });

  it('takes a stale lock of another pid namespace over without waiting', async () => {
    const dir = newDir();
    writeLock(dir, { pid: 1, scope: ELSEWHERE }, Date.now() - 2 * TIMING.staleMs);
    const told: string[] = [];
    const lock = await lockDataDir(dir, { ...TIMING, onWait: (message) => told.push(message) });
    lock.release();
    expect(told).toEqual([]);
  });

  it('in its own pid namespace goes by the pid: a live other one is refused even when stale, a dead one taken at once even when fresh', async () => {
    const other = await otherLiveProcess();
    try {
      const dir = newDir();
      writeLock(dir, { pid: other.pid, scope: ourScope }, Date.now() - 2 * TIMING.staleMs);
      await expect(lockDataDir(dir, TIMING)).rejects.toThrow(new RegExp(`in use by process ${other.pid} \\(lock file`));
    } finally {
      other.stop();
    }
    const dir = newDir();
    writeLock(dir, { pid: await exitedPid(), scope: ourScope });
    const began = Date.now();
    const lock = await lockDataDir(dir, { ...TIMING, onWait: () => expect.fail('waited') });
    lock.release();
    expect(Date.now() - began).toBeLessThan(TIMING.staleMs);
  });

  it("judges an earlier version's lock (a pid only) by its pid while it lives, otherwise by its age", async () => {
    const other = await otherLiveProcess();
    try {
      const dir = newDir();
      writeFileSync(lockPath(dir), String(other.pid));
      touch(lockPath(dir), Date.now() - 2 * TIMING.staleMs);
      await expect(lockDataDir(dir, TIMING)).rejects.toThrow(`in use by process ${other.pid}`);
    } finally {
      other.stop();
    }
    const dir = newDir();
    writeFileSync(lockPath(dir), String(await exitedPid()));
    const told: string[] = [];
    const lock = await lockDataDir(dir, { ...TIMING, onWait: (message) => told.push(message) });
    lock.release();
    expect(told).toHaveLength(1);
  });

  it('on release leaves a lock that is no longer its own (taken over while this process was frozen)', async () => {
    const dir = newDir();
    const lock = await lockDataDir(dir, TIMING);
    writeLock(dir, { pid: 1, scope: ELSEWHERE });
    lock.release();
    expect(parse(readFileSync(lockPath(dir), 'utf8')).token).toBe('theirs');
  });

  it('backs off a takeover when a rival renamed its own lock over ours before the read-back', async () => {
    const dir = newDir();
    writeLock(dir, { pid: 1, scope: ELSEWHERE }, Date.now() - 2 * TIMING.staleMs);
    // Up to its first wait (the settle) lockDataDir runs synchronously: its rename is done here.
    const taking = lockDataDir(dir, { ...TIMING, onWait: () => {} });
    expect(parse(readFileSync(lockPath(dir), 'utf8')).token).not.toBe('theirs');
    // A rival's rename a moment later, and the rival's heartbeat from then on.
    writeLock(dir, { pid: 4242, scope: ELSEWHERE });
    const beat = setInterval(() => touch(lockPath(dir), Date.now()), TIMING.heartbeatMs);
    try {
      await expect(taking).rejects.toThrow('in use by process 4242');
    } finally {
      clearInterval(beat);
    }
    expect(parse(readFileSync(lockPath(dir), 'utf8')).token).toBe('theirs');
  });

  it('lets one of several processes taking over the same stale lock at the same moment through', { timeout: 60_000 }, async () => {
    const dir = newDir();
    writeLock(dir, { pid: 1, scope: ELSEWHERE }, Date.now() - 2 * TIMING.staleMs);
    const code = await lockerScript();
    // All of them read the stale lock before any rename: they start at one agreed moment.
    const at = Date.now() + 1500;
    const runs = Array.from({ length: 4 }, () => runLocker(code, dir, at));
    const outcomes = await Promise.all(runs);
    expect(outcomes.filter((outcome) => outcome === 'won')).toHaveLength(1);
    expect(outcomes.filter((outcome) => outcome.startsWith('refused: ') && outcome.includes('in use by process'))).toHaveLength(3);
  });
});

function lockPath(dir: string): string {
  return join(dir, 'gatehouse.lock');
}

function writeLock(dir: string, owner: { pid: number; scope: string }, mtimeMs = Date.now()): void {
  writeFileSync(lockPath(dir), `${owner.pid}\nhost=elsewhere\nscope=${owner.scope}\ntoken=theirs\n`);
  touch(lockPath(dir), mtimeMs);
}

function touch(path: string, mtimeMs: number): void {
  const at = new Date(mtimeMs);
  utimesSync(path, at, at);
}

function parse(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .split('\n')
      .slice(1)
      .filter(Boolean)
      .map((line) => line.split('=', 2) as [string, string]),
  );
}

/** lockDataDir in a process of its own: the module and a few lines around it, bundled for plain node. */
async function lockerScript(): Promise<string> {
  const built = await esbuild.build({
    stdin: {
      contents: `
        import { lockDataDir } from './src/database/pglite/pglite-database.ts';
        const timing = JSON.parse(process.env.LOCK_TIMING);
        await new Promise((resolve) => setTimeout(resolve, Number(process.env.LOCK_AT) - Date.now()));
        try {
          const lock = await lockDataDir(process.env.LOCK_DIR, { ...timing, onWait: () => {} });
          console.log('won');
          // Holds it while the others decide.
          await new Promise((resolve) => setTimeout(resolve, 3 * timing.settleMs));
          lock.release();
        } catch (error) {
          console.log('refused: ' + error.message);
        }
      `,
      resolveDir: root,
      loader: 'ts',
    },
    bundle: true,
    platform: 'node',
    format: 'esm',
    packages: 'external',
    write: false,
  });
  return built.outputFiles[0].text;
}

async function runLocker(code: string, dir: string, at: number): Promise<string> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', code], {
    cwd: root,
    env: { ...process.env, LOCK_DIR: dir, LOCK_AT: String(at), LOCK_TIMING: JSON.stringify(TIMING) },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  await new Promise((resolve) => child.once('exit', resolve));
  return out.trim();
}
