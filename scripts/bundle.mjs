#!/usr/bin/env node
/**
 * Bundles the compiled gateway (dist/src/main.js, tsc's output with its decorator metadata) and
 * the node_modules it loads into dist/bundle/: what `npm start` and the image run.
 *
 * Why: run module by module, Node's loaders keep ~3,300 files' worth of source text and module
 * records alive. Bundled, the same code leaves 29 MB of heap after start instead of 51.5 MB, idles
 * at 128 MB of RSS instead of 157-164 and is ready in half the time, at the same CPU per request.
 * The peak under load did not move: V8 lets a smaller heap grow further (BENCHMARKS.md, session 12).
 *
 * Deliberately not minified: identifiers and lines stay readable in stack traces, and minifying
 * saved only 2 MB more. No `keepNames` either: it wraps every named closure in a call that sets
 * its `name`, per request on the hot path (+16% CPU measured). Names then survive as written,
 * except where two modules' top-level names collide and esbuild renames one; the check below
 * fails the build if that happens to one of the gateway's own classes (Nest logs them, and a
 * future TypeORM class without an explicit table or migration name would depend on it).
 *
 * Usage: node scripts/bundle.mjs   (run by `npm run build`, after tsc)
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outdir = join(root, 'dist', 'bundle');

/**
 * Left to Node at run time, from node_modules: PGlite loads its WASM and data files next to its
 * own module, and pg-native is an optional addon pg only tries.
 */
const EXTERNAL = ['@electric-sql/pglite', '@electric-sql/pglite/*', 'pg-native'];

/** Optional packages a dependency may import that this project does not install (Nest's microservices, …). */
const missing = new Set();
const leaveMissingToRuntime = {
  name: 'leave-missing-to-runtime',
  setup(build) {
    build.onResolve({ filter: /^[^./]/ }, async (args) => {
      if (args.pluginData === 'inner') return undefined;
      const resolved = await build.resolve(args.path, { kind: args.kind, resolveDir: args.resolveDir, importer: args.importer, pluginData: 'inner' });
      if (resolved.errors.length === 0) return resolved;
      // Such imports sit behind a try or a lazy loader that reports the package missing, as unbundled.
      missing.add(args.path);
      return { path: args.path, external: true };
    });
  },
};

await rm(outdir, { recursive: true, force: true });
const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: { main: 'dist/src/main.js' },
  outdir,
  bundle: true,
  // Lazily imported parts (the stub upstream, the openai SDK driver, PGlite's adapter, tracing)
  // become chunks that load only when a configuration asks for them, as before.
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node22',
  external: EXTERNAL,
  plugins: [leaveMissingToRuntime],
  // CommonJS dependencies call require(); ESM output has none of its own.
  banner: { js: "import { createRequire as __gatehouseCreateRequire } from 'node:module'; const require = __gatehouseCreateRequire(import.meta.url);" },
  // Read only under `NODE_OPTIONS=--enable-source-maps`: chained through tsc's maps back to the
  // TypeScript. Without the sources' text, which stack traces do not need.
  sourcemap: 'linked',
  sourcesContent: false,
  metafile: true,
  logLevel: 'warning',
});

// Read once for both steps below; only asciiOnly writes back.
const outputs = new Map();
for (const path of Object.keys(result.metafile.outputs).filter((p) => p.endsWith('.js'))) outputs.set(path, await readFile(join(root, path), 'utf8'));
await checkOwnClassNames(result.metafile, outputs);
await asciiOnly(outputs);
await writeFile(join(outdir, 'meta.json'), JSON.stringify(result.metafile));
const bytes = [...outputs.keys()].reduce((n, path) => n + result.metafile.outputs[path].bytes, 0);
const inputs = Object.keys(result.metafile.inputs).length;
process.stdout.write(
  `bundle: ${inputs} modules → ${relative(root, outdir)}/main.js (${(bytes / 1048576).toFixed(1)} MB of code in ${outputs.size} files)` +
    (missing.size > 0 ? `; left to run time (not installed): ${[...missing].sort().join(', ')}` : '') +
    '\n',
);

/**
 * Fails when esbuild renamed a class the gateway declares (see the header). Unminified output
 * marks each module's code with a `// <path>` line, so each class is looked for in its own module.
 */
async function checkOwnClassNames(metafile, outputs) {
  const sections = new Map();
  for (const text of outputs.values()) {
    const parts = text.split(/^\/\/ (\S+)$/m);
    for (let i = 1; i < parts.length; i += 2) sections.set(parts[i], (sections.get(parts[i]) ?? '') + parts[i + 1]);
  }
  const own = Object.keys(metafile.inputs).filter((p) => /^dist\/(src|libs)\//.test(p));
  // Without the markers (a minified build, another esbuild) this check would pass having read nothing.
  if (!own.some((path) => sections.has(path))) throw new Error('no `// <path>` module markers in the bundle: cannot check class names');
  const renamed = [];
  for (const path of own) {
    const emitted = sections.get(path);
    if (emitted === undefined) continue;
    const source = await readFile(join(root, path), 'utf8');
    for (const match of source.matchAll(/^(?:export )?(?:abstract )?class ([A-Za-z_$][\w$]*)|^(?:export )?let ([A-Za-z_$][\w$]*) = class /gm)) {
      const name = escape(match[1] ?? match[2]);
      const kept = new RegExp(`(?:class|let|var) ${name}(?![\\w$])`).test(emitted);
      if (!kept && new RegExp(`(?:class|let|var) ${name}\\d+(?![\\w$])`).test(emitted)) renamed.push(`${match[1] ?? match[2]} (${path})`);
    }
  }
  if (renamed.length > 0) {
    throw new Error(`esbuild renamed the gateway's own classes (a name collides with a dependency's): ${renamed.join(', ')}. Rename them in src.`);
  }
}

/**
 * V8 keeps a script's source as one-byte Latin-1 only when every character fits; a single other
 * character makes the whole 10 MB bundle a two-byte string, 20 MB held outside the heap (measured:
 * `external` 24 MB instead of 4). esbuild already escapes strings and templates; what it leaves
 * are comments and regular expression literals, where `\uXXXX` means the same. A source map
 * column after such a character on its line moves by a few places.
 */
async function asciiOnly(outputs) {
  for (const [output, text] of outputs) {
    const path = join(root, output);
    const escaped = text.replace(/[^\x00-\x7f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
    if (escaped !== text) await writeFile(path, escaped);
  }
}

function escape(name) {
  return name.replace(/\$/g, '\\$');
}
