/**
 * CLI: summarise a saved .cpuprofile (from `--profile`, or from `node --cpu-prof`).
 *   node dist/bench/profile-main.js FILE.cpuprofile [--top 25]
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { parseArgs } from 'node:util';
import { type CpuProfile, profileMarkdown, summarizeProfile } from './profile.js';

const { values, positionals } = parseArgs({ options: { top: { type: 'string' } }, allowPositionals: true });
if (positionals.length === 0) {
  process.stderr.write('usage: node dist/bench/profile-main.js FILE.cpuprofile [--top N]\n');
  process.exit(2);
}
for (const file of positionals) {
  const profile = JSON.parse(await readFile(file, 'utf8')) as CpuProfile;
  process.stdout.write(`${profileMarkdown(basename(file), summarizeProfile(profile, Number(values.top ?? 25)))}\n`);
}
