/**
 * `npm run bench` — the gateway against the floors, in one interleaved run.
 *
 *   node dist/bench/run.js [--quick] [--rounds N] [--duration MS] [--warmup MS]
 *                          [--kinds json,sse] [--conns 1,16,64] [--cache miss,hit]
 *                          [--targets direct,floor,parsefloor,gateway,embedded] [--semi-space 16[,0,32]]
 *                          [--heap-growth 0[,30,50]] [--old-space 0[,256,512]] [--pretenure on[,off]]
 *                          [--variant NAME=DIST_DIR]... [--no-md] [--profile] [--profile-ms MS]
 *
 * Everything runs as its own node process on loopback: the stub upstream (answering at once),
 * the floor proxy, the parse floor proxy, the gateway in production configuration (PostgreSQL + Redis) and, reported
 * separately, the embedded default (PGlite, in-memory drivers), and the load generator. Rounds
 * are interleaved (every case runs against every target, target order rotating per round) so
 * drift and noise spread evenly. Exit code 1 when any request failed or missed the stub.
 * See BENCHMARKS.md for what the columns mean.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, realpathSync } from 'node:fs';
import { mkdir, readFile, appendFile, writeFile } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { type BenchCase, BenchFailure, type BenchTarget, caseLabel, httpStubCounter, measureCase, type MeasuredRun, type Timing } from './measure.js';
import type { PayloadKind } from './load.js';
import { LoadWorker, type NodeProcess, withTimeout } from './processes.js';
import { checkStreamsIncrementally } from './streaming-check.js';
import { type CpuProfile, profileMarkdown, summarizeProfile } from './profile.js';
import {
  aggregate,
  aggregatesMarkdown,
  checksMarkdown,
  checkTargets,
  DIRECT,
  FLOOR,
  PARSE_FLOOR,
  pairedByRound,
  pairedMarkdown,
  REFERENCES,
  replaceSection,
} from './report.js';
import {
  dropBenchDatabase,
  probeCommitLatencyMs,
  provisionTenant,
  recreateBenchDatabase,
  type StartedGateway,
  startFloor,
  startGateway,
  memoryFlags,
  SHIPPED_MEMORY,
  startStub,
} from './targets.js';

/**
 * V8's young generation cap for the gateway, in MB (--max-semi-space-size). Left alone, V8 grows
 * the semi-spaces under load and RSS climbs to ~450 MB; capped at 16 or 8 it plateaus at ~256 MB,
 * and 8 costs ~7% more CPU per request than 16 while 16 costs nothing measurable against the
 * default (BENCHMARKS.md, "Memory").
 */
export const RECOMMENDED_SEMI_SPACE_MB = SHIPPED_MEMORY.semiSpaceMb;

/**
 * How far V8 lets the old generation grow past what survived the last full GC, in percent
 * (--heap-growing-percent; 0 = no flag, V8's own factor of up to 4x). `npm start` passes none: 30-50
 * bounds RSS under load at ~215-220 MB instead of 275-390 MB, but costs 5-25% more CPU per request
 * (BENCHMARKS.md, docs/operations.md "Memory"), so it is the operator's trade, measured here with
 * `--heap-growth 0,50`.
 */
export const DEFAULT_HEAP_GROWING_PERCENT = SHIPPED_MEMORY.heapGrowingPercent;

/**
 * Whether V8 may allocate straight into the old generation from allocation sites whose objects
 * mostly survive a scavenge (allocation-site pretenuring, V8's default, as `npm start` runs).
 * Turning it off (`--pretenure off`, `--no-allocation-site-pretenuring`) changed neither RSS nor
 * CPU beyond the spread between two processes of one build (BENCHMARKS.md, session 19).
 */
export const DEFAULT_PRETENURING = SHIPPED_MEMORY.pretenuring ? 'on' : 'off';

/**
 * --max-old-space-size for the gateway in MB (0 = no flag). Besides the hard cap, V8 derives its
 * heap growing factor from it: 4x the live heap for caps of 1 GB and more, down to 1.3x at 128 MB.
 * Measured with `--old-space 0,256,512`.
 */
export const DEFAULT_OLD_SPACE_MB = SHIPPED_MEMORY.oldSpaceMb;

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const RESULTS_DIR = join(ROOT, 'bench', 'results');
const MARKDOWN = join(ROOT, 'BENCHMARKS.md');

interface Options {
  quick: boolean;
  rounds: number;
  timing: Timing;
  kinds: PayloadKind[];
  conns: number[];
  caches: Array<'miss' | 'hit'>;
  targets: Set<string>;
  semiSpace: number[];
  /** --heap-growing-percent values; every semi-space value runs with each (0 = V8's default). */
  heapGrowth: number[];
  /** --max-old-space-size values in MB; every semi-space × heap-growth pair runs with each (0 = none). */
  oldSpace: number[];
  /** Allocation-site pretenuring per gateway: true = V8's default, as `npm start`; false = `--no-allocation-site-pretenuring`. */
  pretenure: boolean[];
  writeMarkdown: boolean;
  profile: boolean;
  profileMs: number;
  /** Extra production gateways started from saved builds (name → dist dir), e.g. before/after a fix. */
  variants: Array<{ name: string; dist: string }>;
  /** synchronous_commit=off on the bench database: the gateway's cost without the disk's. */
  pgAsyncCommit: boolean;
}

export function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      rounds: { type: 'string' },
      duration: { type: 'string' },
      warmup: { type: 'string' },
      kinds: { type: 'string' },
      conns: { type: 'string' },
      cache: { type: 'string' },
      targets: { type: 'string' },
      'semi-space': { type: 'string' },
      'heap-growth': { type: 'string' },
      'old-space': { type: 'string' },
      pretenure: { type: 'string' },
      'no-md': { type: 'boolean' },
      profile: { type: 'boolean' },
      'profile-ms': { type: 'string' },
      variant: { type: 'string', multiple: true },
      'pg-async-commit': { type: 'boolean' },
    },
    strict: true,
  });
  const quick = values.quick === true;
  const list = (v: string | undefined, fallback: string[]): string[] =>
    v === undefined
      ? fallback
      : v
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean);
  const int = (v: string | undefined, fallback: number, name: string): number => {
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a whole number, got ${v}`);
    return n;
  };
  const kinds = list(values.kinds, ['json', 'sse']);
  for (const k of kinds) if (k !== 'json' && k !== 'sse') throw new Error(`--kinds: unknown kind ${k}`);
  const caches = list(values.cache, ['miss', 'hit']);
  for (const c of caches) if (c !== 'miss' && c !== 'hit') throw new Error(`--cache: unknown case ${c}`);
  const targets = list(values.targets, quick ? ['direct', 'floor', 'parsefloor', 'gateway'] : ['direct', 'floor', 'parsefloor', 'gateway', 'embedded']);
  for (const t of targets) if (!['direct', 'floor', 'parsefloor', 'gateway', 'embedded'].includes(t)) throw new Error(`--targets: unknown target ${t}`);
  const conns = list(values.conns, quick ? ['1', '16'] : ['1', '16', '64']).map((c) => int(c, 1, 'conns'));
  const semiSpace = list(values['semi-space'], [String(RECOMMENDED_SEMI_SPACE_MB)]).map((s) => int(s, 0, 'semi-space'));
  const heapGrowth = list(values['heap-growth'], [String(DEFAULT_HEAP_GROWING_PERCENT)]).map((s) => int(s, 0, 'heap-growth'));
  const oldSpace = list(values['old-space'], [String(DEFAULT_OLD_SPACE_MB)]).map((s) => int(s, 0, 'old-space'));
  const pretenure = list(values.pretenure, [DEFAULT_PRETENURING]).map((s) => {
    if (s !== 'on' && s !== 'off') throw new Error(`--pretenure takes on or off, got ${s}`);
    return s === 'on';
  });
  return {
    quick,
    rounds: int(values.rounds, quick ? 1 : 3, 'rounds'),
    timing: { warmupMs: int(values.warmup, quick ? 300 : 500, 'warmup'), durationMs: int(values.duration, quick ? 1000 : 3000, 'duration'), timeoutMs: 10_000 },
    kinds: kinds as PayloadKind[],
    conns,
    caches: caches as Array<'miss' | 'hit'>,
    targets: new Set(targets),
    semiSpace,
    heapGrowth,
    oldSpace,
    pretenure,
    writeMarkdown: values['no-md'] !== true && !quick,
    profile: values.profile === true,
    profileMs: int(values['profile-ms'], 10_000, 'profile-ms'),
    pgAsyncCommit: values['pg-async-commit'] === true,
    variants: parseVariants(values.variant ?? []),
  };
}

/** The names the bench gives its own targets: the report pools every run of one name together. */
const TAKEN_NAMES: readonly string[] = [...REFERENCES, 'gateway', 'embedded'];

function parseVariants(args: readonly string[]): Options['variants'] {
  const variants: Options['variants'] = [];
  for (const v of args) {
    const at = v.indexOf('=');
    if (at <= 0) throw new Error(`--variant must be NAME=DIST_DIR, got ${v}`);
    const name = v.slice(0, at);
    // Sharing a name would silently average a saved build's figures into another target's.
    if (TAKEN_NAMES.includes(name) || name.startsWith('gateway/')) throw new Error(`--variant: the name "${name}" is taken by one of the bench's own targets`);
    if (variants.some((other) => other.name === name)) throw new Error(`--variant: the name "${name}" is given twice`);
    variants.push({ name, dist: resolve(v.slice(at + 1)) });
  }
  return variants;
}

interface Meta {
  type: 'meta';
  date: string;
  commit: string;
  node: string;
  nproc: number;
  cpuModel: string;
  mode: string;
  rounds: number;
  timing: Timing;
  gateways: Array<{ name: string; flavour: string; nodeFlags: string[]; budgetActive: boolean; budgetStatus: number }>;
  postgres: { synchronousCommit: boolean; commitLatencyMs: number } | undefined;
  /** 1/5/15-minute load averages at the start: other work on the machine skews every figure. */
  loadAverage: number[];
}

function gitCommit(): string {
  try {
    const sha = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: ROOT, encoding: 'utf8' }).trim() !== '';
    return dirty ? `${sha}-dirty` : sha;
  } catch {
    return 'unknown';
  }
}

function cpuModel(): string {
  return cpus()[0]?.model.trim() ?? 'unknown';
}

/** Everything started, so a failure anywhere still stops every child process. */
class Fleet {
  readonly procs: NodeProcess[] = [];
  readonly gateways: StartedGateway[] = [];
  load: LoadWorker | undefined;
  databaseCreated = false;

  async stop(): Promise<void> {
    await Promise.allSettled(this.gateways.map((g) => g.cleanup()));
    await Promise.allSettled(this.procs.map((p) => p.stop()));
    await this.load?.stop().catch(() => undefined);
    if (this.databaseCreated) await dropBenchDatabase().catch(() => undefined);
  }
}

interface MemoryFlags {
  semiSpaceMb: number;
  heapGrowingPercent: number;
  oldSpaceMb: number;
  pretenuring: boolean;
}

/** The first value of each memory option: what variants and the embedded gateway run with. */
function defaultMemory(options: Options): MemoryFlags {
  return {
    semiSpaceMb: options.semiSpace[0] ?? 0,
    heapGrowingPercent: options.heapGrowth[0] ?? 0,
    oldSpaceMb: options.oldSpace[0] ?? 0,
    pretenuring: options.pretenure[0] ?? SHIPPED_MEMORY.pretenuring,
  };
}

function gatewayName(base: string, memory: MemoryFlags, options: Options): string {
  const parts: string[] = [];
  if (options.semiSpace.length > 1) parts.push(`semi${memory.semiSpaceMb === 0 ? '-v8default' : memory.semiSpaceMb}`);
  if (options.heapGrowth.length > 1) parts.push(`hg${memory.heapGrowingPercent === 0 ? '-v8default' : memory.heapGrowingPercent}`);
  if (options.oldSpace.length > 1) parts.push(`old${memory.oldSpaceMb === 0 ? '-v8default' : memory.oldSpaceMb}`);
  if (options.pretenure.length > 1) parts.push(`pretenure-${memory.pretenuring ? 'on' : 'off'}`);
  return parts.length === 0 ? base : `${base}/${parts.join('-')}`;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = new Date();
  const commit = gitCommit();
  const stamp = started.toISOString().replace(/:/g, '').replace(/\..*$/, '').replace('T', '-');
  const fleet = new Fleet();
  const stopOnSignal = (): void => {
    void fleet.stop().finally(() => process.exit(130));
  };
  process.once('SIGINT', stopOnSignal);
  process.once('SIGTERM', stopOnSignal);

  try {
    fleet.load = new LoadWorker();
    const stub = await startStub();
    fleet.procs.push(stub.proc);
    const counter = httpStubCounter(stub.origin);
    const targets: BenchTarget[] = [];
    const model = 'openai/gpt-4o-mini';
    if (options.targets.has('direct')) targets.push({ name: DIRECT, endpoint: `${stub.url}/chat/completions`, headers: {}, model, pid: undefined });
    if (options.targets.has('floor') && !options.profile) {
      const floor = await startFloor(stub.origin);
      fleet.procs.push(floor.proc);
      targets.push({ name: FLOOR, endpoint: `${floor.origin}/v1/chat/completions`, headers: {}, model, pid: floor.proc.pid });
    }
    if (options.targets.has('parsefloor') && !options.profile) {
      const parseFloor = await startFloor(stub.origin, 'parseFloor');
      fleet.procs.push(parseFloor.proc);
      targets.push({ name: PARSE_FLOOR, endpoint: `${parseFloor.origin}/v1/chat/completions`, headers: {}, model, pid: parseFloor.proc.pid });
    }
    const tenants: Meta['gateways'] = [];
    let postgres: Meta['postgres'];
    const addGateway = async (gateway: StartedGateway): Promise<BenchTarget> => {
      fleet.gateways.push(gateway);
      const tenant = await provisionTenant(gateway.origin, gateway.adminKey);
      tenants.push({
        name: gateway.name,
        flavour: gateway.flavour,
        nodeFlags: gateway.nodeFlags,
        budgetActive: tenant.budgetActive,
        budgetStatus: tenant.budgetStatus,
      });
      // A short TTL keeps the shared Redis from filling up with the miss runs' distinct bodies.
      const headers = { authorization: `Bearer ${tenant.key}`, 'x-gateway-cache-ttl': '60' };
      // No model in the body: the routing table picks it, as for a client that sends a task type.
      return { name: gateway.name, endpoint: `${gateway.origin}/v1/chat/completions`, headers, model: undefined, pid: gateway.proc.pid };
    };
    if (options.targets.has('gateway') || options.profile || options.variants.length > 0) {
      const databaseUrl = await recreateBenchDatabase(options.pgAsyncCommit);
      fleet.databaseCreated = true;
      postgres = { synchronousCommit: !options.pgAsyncCommit, commitLatencyMs: await probeCommitLatencyMs(databaseUrl) };
      process.stderr.write(
        `PostgreSQL: synchronous_commit ${options.pgAsyncCommit ? 'off' : 'on'}, one-row INSERT+COMMIT takes ${postgres.commitLatencyMs.toFixed(2)} ms (median)\n`,
      );
      const defaults = defaultMemory(options);
      for (const variant of options.profile ? [] : options.variants) {
        process.stderr.write(`starting ${variant.name} (PostgreSQL + Redis, build in ${variant.dist})…\n`);
        // A copy of dist/ made since the bundle exists runs its bundle, as `npm start` would; an older one its src.
        const bundled = join(variant.dist, 'bundle', 'main.js');
        const entry = existsSync(bundled) ? bundled : join(variant.dist, 'src', 'main.js');
        targets.push(await addGateway(await startGateway({ name: variant.name, flavour: 'production', stubUrl: stub.url, databaseUrl, ...defaults, entry })));
      }
      const memories: MemoryFlags[] = [];
      for (const semiSpaceMb of options.semiSpace)
        for (const heapGrowingPercent of options.heapGrowth)
          for (const oldSpaceMb of options.oldSpace)
            for (const pretenuring of options.pretenure) memories.push({ semiSpaceMb, heapGrowingPercent, oldSpaceMb, pretenuring });
      const variants = options.profile ? memories.slice(0, 1) : options.targets.has('gateway') ? memories : [];
      for (const memory of variants) {
        const name = gatewayName('gateway', memory, options);
        process.stderr.write(`starting ${name} (PostgreSQL + Redis${memoryFlags(memory).map((f) => `, ${f}`).join('')})…\n`);
        targets.push(await addGateway(await startGateway({ name, flavour: 'production', stubUrl: stub.url, databaseUrl, ...memory, profiled: options.profile })));
      }
    }
    if (options.targets.has('embedded') && !options.profile) {
      process.stderr.write('starting embedded (PGlite, in-memory drivers)…\n');
      targets.push(
        await addGateway(
          await startGateway({
            name: 'embedded',
            flavour: 'embedded',
            stubUrl: stub.url,
            ...defaultMemory(options),
          }),
        ),
      );
    }
    for (const t of tenants) {
      process.stderr.write(`${t.name}: budget stage ${t.budgetActive ? 'active' : `not active (PUT /admin/budgets/users → ${t.budgetStatus})`}\n`);
    }

    await mkdir(RESULTS_DIR, { recursive: true });
    const meta: Meta = {
      type: 'meta',
      date: started.toISOString(),
      commit,
      node: process.version,
      nproc: cpus().length,
      cpuModel: cpuModel(),
      mode: options.profile ? 'profile' : options.quick ? 'quick' : 'full',
      rounds: options.rounds,
      timing: options.timing,
      gateways: tenants,
      postgres,
      loadAverage: loadavg(),
    };

    if (options.profile) {
      await profileRun(options, fleet, targets, counter, stamp, commit);
      return;
    }

    const jsonl = join(RESULTS_DIR, `${stamp}-${commit}${options.quick ? '-quick' : ''}.jsonl`);
    await writeFile(jsonl, `${JSON.stringify(meta)}\n`);
    const load = fleet.load;
    let seq = 0;
    // JIT, connection pools and the key cache warm up once per target before anything is
    // recorded; otherwise whichever case runs first pays for it. Still verified like any run.
    for (const target of targets) {
      for (const kind of options.kinds) {
        const benchCase: BenchCase = { kind, connections: 16, cache: 'miss' };
        await measureCase({
          round: 0,
          target,
          benchCase,
          timing: { ...options.timing, warmupMs: 0, durationMs: options.quick ? 1000 : 2000 },
          stub: counter,
          load: load.run,
          tag: `${stamp}-warm-${target.name}-${kind}`,
        });
      }
    }
    process.stderr.write('warm-up done\n');
    if (options.kinds.includes('sse')) {
      for (const target of targets) {
        const check = await checkStreamsIncrementally(target, stub.origin, `${stamp}-${seq++}`);
        await appendFile(jsonl, `${JSON.stringify({ type: 'streaming', ...check })}\n`);
        process.stderr.write(
          `${target.name}: SSE relayed live (${check.chunks} content chunks over ${check.spreadMs.toFixed(0)} ms; upstream spread ${check.expectedMs} ms)\n`,
        );
      }
    }

    const trips: RoundTrips[] = [];
    const stubPort = Number(new URL(stub.url).port);
    for (const target of targets) {
      if (target.pid === undefined) continue;
      for (const benchCase of roundTripCases(options, target.name)) {
        const counted = await countRoundTrips(target, benchCase, stubPort, counter, load.run, `${stamp}-trips-${seq++}`, options.quick ? 100 : 200);
        trips.push(counted);
        await appendFile(jsonl, `${JSON.stringify(counted)}\n`);
      }
    }

    const runs: MeasuredRun[] = [];
    const pairs = options.kinds.flatMap((kind) => options.conns.map((connections) => ({ kind, connections })));
    const total =
      options.rounds *
      pairs.length *
      targets.reduce((n, t) => n + (REFERENCES.includes(t.name) ? (options.caches.includes('miss') ? 1 : 0) : options.caches.length), 0);
    let done = 0;
    for (let round = 1; round <= options.rounds; round++) {
      // Rotating the order per round keeps "who ran right after a heavy case" from being systematic.
      const order = targets.map((_, i) => targets[(i + round - 1) % targets.length]);
      for (const pair of pairs) {
        for (const target of order) {
          const isReference = REFERENCES.includes(target.name);
          for (const cache of options.caches) {
            if (isReference && cache === 'hit') continue;
            const benchCase: BenchCase = { ...pair, cache };
            const run = await withTimeout(
              measureCase({ round, target, benchCase, timing: options.timing, stub: counter, load: load.run, tag: `${stamp}-${seq++}` }),
              options.timing.warmupMs + options.timing.durationMs + options.timing.timeoutMs + 30_000,
              `${target.name} ${caseLabel(benchCase)} to finish`,
            ).catch((error: unknown) => {
              throw explainExit(fleet, error);
            });
            runs.push(run);
            await appendFile(jsonl, `${JSON.stringify(run.record)}\n`);
            done++;
            const r = run.record;
            process.stderr.write(
              `[${done}/${total}] round ${round} ${target.name.padEnd(11)} ${caseLabel(benchCase).padEnd(16)} ${r.rps.toFixed(0).padStart(6)} req/s  p50 ${r.latencyMs.p50.toFixed(3)} ms` +
                `${r.cpuUsPerRequest !== undefined ? `  cpu ${r.cpuUsPerRequest.toFixed(0)} µs/req` : ''}` +
                `${r.cpuSeconds && r.cpuSystemSeconds !== undefined ? ` (${((100 * r.cpuSystemSeconds) / r.cpuSeconds).toFixed(0)}% kernel)` : ''}${r.rssMaxMb !== undefined ? `  rss ${r.rssMaxMb.toFixed(0)} MB` : ''}` +
                `${cache === 'hit' ? `  hits ${(100 * r.hitRatio).toFixed(0)}%` : ''}\n`,
            );
          }
        }
      }
    }

    const aggregates = aggregate(runs);
    for (const a of aggregates) await appendFile(jsonl, `${JSON.stringify({ type: 'summary', ...a })}\n`);
    const gatewayTargets = targets.filter((t) => !REFERENCES.includes(t.name)).map((t) => t.name);
    const checks = gatewayTargets.map((name) => ({ name, checks: checkTargets(aggregates, name) }));
    for (const { name, checks: list } of checks) await appendFile(jsonl, `${JSON.stringify({ type: 'targets', target: name, checks: list })}\n`);
    // This build against each saved build, round by round: the before/after of a change.
    const paired = gatewayTargets.includes('gateway')
      ? options.variants.map((v) => ({ candidate: 'gateway', baseline: v.name, cases: pairedByRound(runs, 'gateway', v.name) }))
      : [];
    for (const p of paired) await appendFile(jsonl, `${JSON.stringify({ type: 'paired', ...p })}\n`);

    const section = renderSection(meta, options, aggregates, checks, paired, trips, jsonl);
    process.stdout.write(`\n${section}\n`);
    if (options.writeMarkdown) {
      const current = await readFile(MARKDOWN, 'utf8').catch(() => '# Benchmarks\n');
      await writeFile(MARKDOWN, replaceSection(current, section));
      process.stderr.write(`\nBENCHMARKS.md updated; raw results in ${jsonl}\n`);
    } else {
      process.stderr.write(`\nraw results in ${jsonl} (BENCHMARKS.md is updated by full runs only)\n`);
    }
  } finally {
    await fleet.stop();
    process.off('SIGINT', stopOnSignal);
    process.off('SIGTERM', stopOnSignal);
  }
}

/** When a run fails because a process died, say which one and show what it printed. */
function explainExit(fleet: Fleet, error: unknown): unknown {
  const dead = [...fleet.gateways.map((g) => g.proc), ...fleet.procs].filter((p) => !p.alive);
  if (dead.length === 0) return error;
  const detail = dead
    .map(
      (p) =>
        `${p.name} exited (${p.exitSignal ? `killed by ${p.exitSignal}` : `code ${String(p.exitCode)}`}); its output ends with:\n${p.stderrTail() || '(nothing)'}`,
    )
    .join('\n');
  return new BenchFailure(`${error instanceof Error ? error.message : String(error)}\n${detail}`);
}

function renderSection(
  meta: Meta,
  options: Options,
  aggregates: ReturnType<typeof aggregate>,
  checks: Array<{ name: string; checks: ReturnType<typeof checkTargets> }>,
  paired: ReadonlyArray<{ candidate: string; baseline: string; cases: ReturnType<typeof pairedByRound> }>,
  trips: readonly RoundTrips[],
  jsonl: string,
): string {
  const stage = (g: Meta['gateways'][number]): string => {
    const hits = aggregates.filter((a) => a.target === g.name && a.cache === 'hit');
    const cache = hits.length === 0 ? 'not measured' : hits.some((a) => a.hitRatio > 0) ? 'active' : 'not active';
    return `\`${g.name}\` (${g.flavour === 'production' ? 'PostgreSQL + Redis' : 'PGlite, in-memory drivers'}${g.nodeFlags.length ? `, \`${g.nodeFlags.join(' ')}\`` : ''}): budget ${g.budgetActive ? 'active' : 'not active'}, cache ${cache}, logs at \`info\` (the default; stdout read by the bench)`;
  };
  const lines = [
    `### Latest ${meta.mode} run`,
    '',
    `- **Date** ${meta.date} · **commit** \`${meta.commit}\` · **Node** ${meta.node} · **machine** ${meta.nproc} × ${meta.cpuModel}`,
    `- ${options.rounds} interleaved round(s) × ${options.timing.durationMs} ms measured per case (after ${options.timing.warmupMs} ms warm-up); raw runs: \`${jsonl.slice(ROOT.length)}\``,
    ...meta.gateways.map((g) => `- ${stage(g)}`),
    ...(meta.postgres
      ? [
          `- PostgreSQL (local): \`synchronous_commit=${meta.postgres.synchronousCommit ? 'on' : 'off'}\` on the bench database; a one-row INSERT+COMMIT took ${meta.postgres.commitLatencyMs.toFixed(2)} ms (median) at the start of the run`,
        ]
      : []),
    `- Machine load average (1/5/15 min) at the start: ${meta.loadAverage.map((l) => l.toFixed(1)).join(' / ')}, at the end: ${loadavg()
      .map((l) => l.toFixed(1))
      .join(' / ')} (${meta.nproc} cores; anything above ~3 means other work competed with the bench)`,
    '',
  ];
  for (const { name, checks: list } of checks) {
    lines.push(`#### Targets: \`${name}\``, '', checksMarkdown(list), '');
  }
  for (const { candidate, baseline, cases } of paired) {
    if (cases.length === 0) continue;
    lines.push(
      `#### Paired per round: \`${candidate}\` against \`${baseline}\``,
      '',
      'Median over the rounds of each round\'s ratio or difference, the spread in brackets; the rounds in which CPU was lower and higher, with the sign test\'s two-sided p. Read a before/after here, not from the pooled figures.',
      '',
      pairedMarkdown(cases, candidate, baseline),
      '',
    );
  }
  lines.push('#### Per case', '', aggregatesMarkdown(aggregates), '');
  if (trips.length > 0) {
    lines.push(
      `#### Round trips per request (TCP data segments the serving process sent, ${trips[0]?.requests ?? 0} requests on 1 connection after a warm-up)`,
      '',
      '| target | case | to PostgreSQL | to Redis | to upstream | to client | cache hits |',
      '|---|---|---:|---:|---:|---:|---:|',
      ...trips.map(
        (t) =>
          `| ${t.target} | ${t.kind} ${t.cache} | ${t.perRequest.postgres.toFixed(2)} | ${t.perRequest.redis.toFixed(2)} | ${t.perRequest.upstream.toFixed(2)} | ${t.perRequest.client.toFixed(2)} | ${(100 * t.hitRatio).toFixed(0)}% |${t.closedSockets > 0 ? ` (${t.closedSockets} sockets closed meanwhile: low)` : ''}`,
      ),
      '',
    );
  }
  return lines.join('\n');
}

const POSTGRES_PORT = 5432;
const REDIS_PORT = 6379;

interface RoundTrips {
  type: 'roundtrips';
  target: string;
  kind: PayloadKind;
  cache: 'miss' | 'hit';
  requests: number;
  hitRatio: number;
  perRequest: { postgres: number; redis: number; upstream: number; client: number };
  closedSockets: number;
}

export function roundTripCases(options: Options, target: string): BenchCase[] {
  // The floors have no cache: a hit row would only repeat their miss row.
  const caches = REFERENCES.includes(target) ? options.caches.filter((cache) => cache === 'miss') : options.caches;
  return options.kinds.flatMap((kind) => caches.map((cache) => ({ kind, connections: 1, cache })));
}

/** One count-bounded run on one connection, with the target's sockets read before and after. */
async function countRoundTrips(
  target: BenchTarget,
  benchCase: BenchCase,
  stubPort: number,
  counter: ReturnType<typeof httpStubCounter>,
  load: LoadWorker['run'],
  tag: string,
  requests: number,
): Promise<RoundTrips> {
  // The hit case's first request fills the cache; the warm-up requests keep it out of the count.
  const timing: Timing = { warmupMs: 0, durationMs: 0, timeoutMs: 10_000, warmupRequests: 10, requests };
  const run = await measureCase({ round: 0, target, benchCase, timing, stub: counter, load, tag, countSends: true });
  const sends = run.record.sends;
  if (!sends) throw new Error(`no socket counts for ${target.name}`);
  const n = run.record.requests;
  const peer = (port: number): number => (sends.byPeerPort[String(port)] ?? 0) / n;
  return {
    type: 'roundtrips',
    target: target.name,
    kind: benchCase.kind,
    cache: benchCase.cache,
    requests: n,
    hitRatio: run.record.hitRatio,
    perRequest: { postgres: peer(POSTGRES_PORT), redis: peer(REDIS_PORT), upstream: peer(stubPort), client: sends.client / n },
    closedSockets: sends.closedSockets,
  };
}

/** --profile: the gateway under load with V8's sampler on, one profile per payload kind. */
async function profileRun(
  options: Options,
  fleet: Fleet,
  targets: BenchTarget[],
  counter: ReturnType<typeof httpStubCounter>,
  stamp: string,
  commit: string,
): Promise<void> {
  const gateway = fleet.gateways[0];
  const target = targets.find((t) => t.name === gateway?.name);
  const load = fleet.load;
  if (!gateway || !target || !load) throw new Error('profile mode needs the production gateway');
  const dir = join(RESULTS_DIR, 'profiles');
  await mkdir(dir, { recursive: true });
  const connections = options.conns.includes(16) ? 16 : (options.conns[0] ?? 16);
  const out: string[] = [];
  for (const kind of options.kinds) {
    for (const cache of options.caches) {
      const benchCase: BenchCase = { kind, connections, cache };
      // Warm up (JIT, pools, caches) before the sampler starts.
      await measureCase({
        round: 0,
        target,
        benchCase,
        timing: { ...options.timing, durationMs: 2000 },
        stub: counter,
        load: load.run,
        tag: `${stamp}-pw-${kind}-${cache}`,
      });
      await profilerCommand(gateway.proc, { profile: 'start', intervalUs: 250 }, 'profiling');
      const run = await measureCase({
        round: 0,
        target,
        benchCase,
        timing: { ...options.timing, warmupMs: 0, durationMs: options.profileMs },
        stub: counter,
        load: load.run,
        tag: `${stamp}-p-${kind}-${cache}`,
      });
      const path = join(dir, `${stamp}-${commit}-${kind}-${cache}.cpuprofile`);
      await profilerCommand(gateway.proc, { profile: 'stop', path }, 'profiled');
      const summary = summarizeProfile(JSON.parse(await readFile(path, 'utf8')) as CpuProfile);
      const title = `${gateway.name} ${caseLabel(benchCase)}: ${run.record.rps.toFixed(0)} req/s, ${run.record.cpuUsPerRequest?.toFixed(0) ?? 'n/a'} µs CPU/req (profiler on)`;
      out.push(profileMarkdown(title, summary));
      process.stderr.write(`profile written: ${path}\n`);
    }
  }
  const text = out.join('\n');
  await writeFile(join(dir, `${stamp}-${commit}.md`), text);
  process.stdout.write(`${text}\n`);
}

async function profilerCommand(proc: NodeProcess, message: Record<string, unknown>, replyKey: string): Promise<void> {
  const child = proc.child;
  await withTimeout(
    new Promise<void>((resolve, reject) => {
      const onMessage = (reply: unknown): void => {
        if (typeof reply !== 'object' || reply === null) return;
        if (replyKey in reply) {
          child.off('message', onMessage);
          resolve();
        } else if ('profileError' in reply) {
          child.off('message', onMessage);
          reject(new Error(`profiler: ${String(reply.profileError)}`));
        }
      };
      child.on('message', onMessage);
      child.send(message);
    }),
    30_000,
    `profiler ${String(message.profile)}`,
  );
}

/** Whether node was started on this file, rather than it being imported (by its spec). */
function isEntryPoint(): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  main().then(
    () => {
      process.exit(process.exitCode ?? 0);
    },
    (error: unknown) => {
      if (error instanceof BenchFailure) {
        process.stderr.write(`\nBENCH FAILED: ${error.message}\n`);
      } else {
        process.stderr.write(`\nbench crashed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      }
      process.exit(1);
    },
  );
}
