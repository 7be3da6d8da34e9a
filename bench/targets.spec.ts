import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { firstJsonLine, spawnNode } from './processes.js';
import { memoryFlags, SHIPPED_MEMORY } from './targets.js';

const root = new URL('../', import.meta.url);
const scripts = (JSON.parse(readFileSync(new URL('package.json', root), 'utf8')) as { scripts: Record<string, string> }).scripts;
const dockerfile = readFileSync(new URL('docker/Dockerfile', root), 'utf8');

/** The V8 flags of a `node … dist/bundle/main.js` command: what stands between `node` and the entry. */
function nodeFlagsOf(command: string): string[] {
  const words = command.split(/\s+/);
  return words.slice(words.indexOf('node') + 1, words.indexOf('dist/bundle/main.js'));
}

// The bench's verdicts hold for what ships only if the bench's gateway runs with the same V8
// flags; a flag added to one of these commands and not to SHIPPED_MEMORY would go unmeasured.
describe('the memory flags the gateway ships with', () => {
  it('npm start and start:worker pass exactly the flags the bench runs the gateway with', () => {
    expect(nodeFlagsOf(scripts.start)).toEqual(memoryFlags(SHIPPED_MEMORY));
    expect(nodeFlagsOf(scripts['start:worker'])).toEqual(memoryFlags(SHIPPED_MEMORY));
    expect(memoryFlags(SHIPPED_MEMORY)).toEqual(['--max-semi-space-size=16']);
  });

  it("the image's CMD passes them too", () => {
    const cmd = /^CMD (\[.*\])$/m.exec(dockerfile);
    expect(cmd).not.toBeNull();
    expect(nodeFlagsOf((JSON.parse(cmd?.[1] ?? '[]') as string[]).join(' '))).toEqual(memoryFlags(SHIPPED_MEMORY));
  });

  it('renders each setting that differs from V8 as its flag', () => {
    expect(memoryFlags({ semiSpaceMb: 8, heapGrowingPercent: 50, oldSpaceMb: 192, pretenuring: true })).toEqual([
      '--max-semi-space-size=8',
      '--heap-growing-percent=50',
      '--max-old-space-size=192',
    ]);
    expect(memoryFlags({ semiSpaceMb: 0, heapGrowingPercent: 0, oldSpaceMb: 0, pretenuring: false })).toEqual(['--no-allocation-site-pretenuring']);
  });
});

describe('the node flags of the measured processes', () => {
  const saved = process.env.NODE_OPTIONS;
  afterEach(() => {
    if (saved === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = saved;
  });

  // A heap cap or a profiler flag in the caller's shell would change the figures and appear in no record.
  it("leave out the caller's NODE_OPTIONS, whether the process inherits the environment or gets a copy of it", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bench-node-options-'));
    try {
      const script = join(dir, 'print-node-options.mjs');
      await writeFile(script, "process.stdout.write(JSON.stringify({ nodeOptions: process.env.NODE_OPTIONS ?? null }) + '\\n');\n");
      process.env.NODE_OPTIONS = '--max-old-space-size=123';
      for (const options of [{}, { env: { ...process.env } }]) {
        const proc = spawnNode('printer', script, [], options);
        try {
          expect(await firstJsonLine<{ nodeOptions: string | null }>(proc)).toEqual({ nodeOptions: null });
        } finally {
          await proc.stop();
        }
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
