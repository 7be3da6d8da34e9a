import { existsSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

/**
 * The artifact that ships: `npm start` and the image run dist/bundle/main.js (scripts/bundle.mjs).
 * Suites that start it as its own process check first that it is fresh: an old bundle would test
 * old code.
 */
const root = join(import.meta.dirname, '..', '..');
export const BUNDLE = join(root, 'dist', 'bundle', 'main.js');

/** Newest modification time under a directory (the sources the bundle is built from). */
function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && entry.name.endsWith('.ts')) newest = Math.max(newest, statSync(join(entry.parentPath, entry.name)).mtimeMs);
  }
  return newest;
}

/** A fresh bundle, or a failure that says how to get one. */
export function assertBundleIsFresh(): void {
  if (!existsSync(BUNDLE)) throw new Error(`${relative(root, BUNDLE)} is missing: run \`npm run build\` (npm test does)`);
  const sources = Math.max(newestMtime(join(root, 'src')), newestMtime(join(root, 'libs')));
  if (sources > statSync(BUNDLE).mtimeMs) throw new Error(`${relative(root, BUNDLE)} is older than the sources: run \`npm run build\` (npm test does)`);
}
