import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { type DatabaseTarget, openDatabase } from '../../src/database/data-source.js';
import { pgliteTarget } from '../support/databases.js';
import { exitedPid, otherLiveProcess } from '../support/processes.js';

/**
 * The embedded database in a directory (DATA_DIR), as `npm start` and the image use it. The image
 * makes only /app/data writable for its `node` user, not /app around it (docker/Dockerfile), so
 * the gateway may write inside DATA_DIR and nowhere else. The run's migrated template stands in
 * for initdb; the later tests start from a copy of a directory it was loaded into once.
 */
describe('the embedded database in DATA_DIR', () => {
  let base: string;
  let template: Blob;
  let prepared: string;
  let next = 0;

  beforeAll(async () => {
    base = mkdtempSync(join(tmpdir(), 'gatehouse-data-dir-'));
    template = ((await pgliteTarget()) as Extract<DatabaseTarget, { template?: Blob }>).template as Blob;
    prepared = join(base, 'prepared');
    await (await start(prepared)).close();
  });
  afterAll(() => {
    rmSync(base, { recursive: true, force: true });
  });

  async function start(dataDir: string): Promise<{ close(): Promise<void>; query(sql: string): Promise<unknown> }> {
    const opened = await openDatabase({ driver: 'pglite', dataDir, template }, DATABASE_CONTENT);
    return { close: () => opened.close(), query: (sql) => opened.dataSource.query(sql) };
  }

  /** A DATA_DIR holding a database (no lock), in a directory of its own. */
  function existingDataDir(): string {
    const dataDir = join(base, `case-${++next}`, 'data');
    cpSync(prepared, dataDir, { recursive: true });
    return dataDir;
  }

  it('starts with DATA_DIR writable and its parent not (the image: /app/data in a root-owned /app), lock inside', async () => {
    const app = join(base, 'app');
    const dataDir = join(app, 'data');
    mkdirSync(dataDir, { recursive: true });
    // Root may write regardless; the listings below catch a file put beside DATA_DIR then.
    chmodSync(app, 0o555);
    try {
      const db = await start(dataDir);
      try {
        expect(readdirSync(app)).toEqual(['data']);
        await expect(db.query('SELECT count(*)::int AS n FROM migrations')).resolves.toEqual([{ n: (DATABASE_CONTENT.migrations as unknown[]).length }]);
        // The run's template was dumped from a directory by the global setup's process, alive all
        // run long: its lock file came along in the dump, and must not stand in for ours.
        expect(readFileSync(join(dataDir, 'gatehouse.lock'), 'utf8').split('\n')[0]).toBe(String(process.pid));
      } finally {
        await db.close();
      }
      expect(readdirSync(app)).toEqual(['data']);
      expect(existsSync(join(dataDir, 'gatehouse.lock'))).toBe(false);
    } finally {
      chmodSync(app, 0o755);
    }
  });

  // A DATA_DIR typo (`.` run from a repository, $HOME, a volume of other files): PGlite's initdb
  // would spread some twenty PostgreSQL entries (base/, pg_wal/, postgresql.conf...) among the
  // user's files and write over any sharing those names. PostgreSQL's initdb refuses it too.
  it('refuses a DATA_DIR that holds other files and no database, naming it, and leaves it as it was', async () => {
    const project = join(base, `case-${++next}`, 'project');
    mkdirSync(join(project, 'src'), { recursive: true });
    writeFileSync(join(project, 'README.md'), 'my project\n');
    writeFileSync(join(project, 'src', 'app.js'), 'console.log(1)\n');
    await expect(start(project)).rejects.toThrow(`PGlite data directory ${project} is not empty and holds no database`);
    expect(readdirSync(project).sort()).toEqual(['README.md', 'src']);
  });

  it('takes a directory that is empty but for what a volume or a repository puts there', async () => {
    const dataDir = join(base, `case-${++next}`, 'data');
    mkdirSync(join(dataDir, 'lost+found'), { recursive: true });
    writeFileSync(join(dataDir, '.gitkeep'), '');
    const db = await start(dataDir);
    try {
      await expect(db.query('SELECT count(*)::int AS n FROM migrations')).resolves.toEqual([{ n: (DATABASE_CONTENT.migrations as unknown[]).length }]);
    } finally {
      await db.close();
    }
  });

  it('refuses DATA_DIR to a second process while the first lives, and takes over once it is gone', async () => {
    const dataDir = existingDataDir();
    const lock = join(dataDir, 'gatehouse.lock');
    const other = await otherLiveProcess();
    try {
      writeFileSync(lock, String(other.pid));
      await expect(start(dataDir)).rejects.toThrow(`in use by process ${other.pid}`);
    } finally {
      other.stop();
    }
    // An earlier version's lock (its pid only, never refreshed) as a kill -9 leaves it, minutes on.
    writeFileSync(lock, String(await exitedPid()));
    const minutesAgo = new Date(Date.now() - 5 * 60_000);
    utimesSync(lock, minutesAgo, minutesAgo);
    const db = await start(dataDir);
    expect(readFileSync(lock, 'utf8').split('\n')[0]).toBe(String(process.pid));
    await db.close();
  });

  it('opens a DATA_DIR an earlier version created, past a stale lock it left beside the directory', async () => {
    // The earlier layout: PGlite's files directly in DATA_DIR, the lock in `<DATA_DIR>.lock`.
    const dataDir = existingDataDir();
    writeFileSync(`${dataDir}.lock`, String(await exitedPid()));
    const db = await start(dataDir);
    try {
      await expect(db.query('SELECT count(*)::int AS n FROM migrations')).resolves.toEqual([{ n: (DATABASE_CONTENT.migrations as unknown[]).length }]);
    } finally {
      await db.close();
    }
    expect(existsSync(`${dataDir}.lock`)).toBe(false);
  });

  it('stays out of a DATA_DIR an earlier version still has open (its lock beside the directory)', async () => {
    const dataDir = existingDataDir();
    const other = await otherLiveProcess();
    try {
      writeFileSync(`${dataDir}.lock`, String(other.pid));
      await expect(start(dataDir)).rejects.toThrow(`in use by process ${other.pid}`);
    } finally {
      other.stop();
    }
  });
});
