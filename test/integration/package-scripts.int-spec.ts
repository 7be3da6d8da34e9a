import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..');

/**
 * `npm run <script>` (and `./run <script>`) runs what the build produced: tsc's output under
 * dist/ (from src, libs and bench) or the bundle scripts/bundle.mjs makes of it. A script that
 * names a file nothing builds dies with ERR_MODULE_NOT_FOUND, after a full build.
 */
describe('package.json scripts', () => {
  it('run only files the build produces', () => {
    const scripts = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    const bundler = readFileSync(join(root, 'scripts', 'bundle.mjs'), 'utf8');
    const bundled = new Map(
      [...(/entryPoints: \{([^}]*)\}/.exec(bundler)?.[1] ?? '').matchAll(/(\w+): '([^']+)'/g)].map((m) => [`dist/bundle/${m[1]}.js`, m[2]]),
    );
    const missing: string[] = [];
    let checked = 0;
    for (const [name, command] of Object.entries(scripts)) {
      for (const [target] of command.matchAll(/\bdist\/\S+\.js\b/g)) {
        checked++;
        const compiled = bundled.get(target) ?? target;
        const source = join(root, compiled.replace(/^dist\//, '').replace(/\.js$/, '.ts'));
        if (!/^dist\/(src|libs|bench)\//.test(compiled) || !existsSync(source)) missing.push(`${name}: ${target}`);
      }
    }
    expect(checked).toBeGreaterThan(0);
    expect(missing).toEqual([]);
  });
});
