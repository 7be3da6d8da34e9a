import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestProject } from 'vitest/node';
import { DATABASE_CONTENT } from '../src/app.module.js';
import { openDatabase } from '../src/database/data-source.js';
import { dumpPgliteTemplate, openPglite } from '../src/database/pglite/index.js';

declare module 'vitest' {
  export interface ProvidedContext {
    pgliteTemplatePath: string;
  }
}

/**
 * PGlite's initdb takes seconds; every test that uses the embedded database instead loads this
 * template: initdb and all migrations, run once per test run.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const dir = await mkdtemp(join(tmpdir(), 'gatehouse-template-'));
  const dataDir = join(dir, 'pgdata');
  const opened = await openDatabase({ driver: 'pglite', dataDir }, DATABASE_CONTENT);
  await opened.close();
  const db = await openPglite({ dataDir });
  const blob = await dumpPgliteTemplate(db);
  await db.close();
  const path = join(dir, 'template.tar');
  await writeFile(path, Buffer.from(await blob.arrayBuffer()));
  project.provide('pgliteTemplatePath', path);
  return async () => {
    await rm(dir, { recursive: true, force: true });
  };
}
