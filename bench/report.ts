/**
 * Turns measured runs into the figures the targets are stated in: rounds pooled per target and
 * case, then ratios against the floor proxy (issue #7) and the parse floor (issue #6's cache-hit
 * target) and latency added over the upstream called directly, all from the same run (the machine
 * is noisy; only same-run ratios mean anything).
 */
import type { PayloadKind } from './load.js';
import type { CacheCase, MeasuredRun } from './measure.js';
import { type LatencySummary, median, pool, ratio, signTestP, summarize } from './stats.js';

export const DIRECT = 'direct';
export const FLOOR = 'floor';
export const PARSE_FLOOR = 'parse floor';
/** The targets that only forward (no cache): measured on misses only, references for the others. */
export const REFERENCES: readonly string[] = [DIRECT, FLOOR, PARSE_FLOOR];

export interface Aggregate {
  target: string;
  kind: PayloadKind;
  connections: number;
  cache: CacheCase;
  rounds: number;
  requests: number;
  rps: number;
  latencyMs: LatencySummary;
  ttfbMs: LatencySummary | undefined;
  cpuUsPerRequest: number | undefined;
  /** Share of the process's CPU spent in the kernel, pooled over rounds (undefined when not recorded). */
  cpuKernelShare: number | undefined;
  /** CPU/request ÷ the floor's (same kind and connections), pooled over rounds. */
  cpuRatioToFloor: number;
  /** The same ratio taken per round, then the median: a check that pooling hides no outlier. */
  cpuRatioToFloorMedianOfRounds: number;
  /** The smallest and largest per-round ratio: how far one round of this machine moves it. */
  cpuRatioToFloorRange: RoundRange | undefined;
  /** CPU/request ÷ the parse floor's (same kind and connections), pooled over rounds. */
  cpuRatioToParseFloor: number;
  cpuRatioToParseFloorMedianOfRounds: number;
  cpuRatioToParseFloorRange: RoundRange | undefined;
  addedP50Ms: number;
  addedP99Ms: number;
  addedTtfbP50Ms: number;
  rssMaxMb: number | undefined;
  hitRatio: number;
  errors: number;
}

export interface RoundRange {
  min: number;
  max: number;
}

const keyOf = (target: string, kind: string, connections: number, cache: string): string => `${target}|${kind}|${connections}|${cache}`;

/** The smallest and largest of per-round figures; only two rounds or more say anything about the noise. */
function roundRange(perRound: readonly number[]): RoundRange | undefined {
  const finite = perRound.filter((v) => Number.isFinite(v));
  return finite.length >= 2 ? { min: Math.min(...finite), max: Math.max(...finite) } : undefined;
}

export function aggregate(runs: readonly MeasuredRun[]): Aggregate[] {
  const groups = new Map<string, MeasuredRun[]>();
  for (const run of runs) {
    const r = run.record;
    const key = keyOf(r.target, r.kind, r.connections, r.cache);
    const list = groups.get(key) ?? [];
    list.push(run);
    groups.set(key, list);
  }
  // Everything but the ratios and deltas, which need the references' figures first.
  const base = new Map<string, Omit<Aggregate, `cpuRatioTo${string}` | `added${string}`>>();
  for (const [key, list] of groups) {
    const first = list[0]?.record;
    if (!first) continue;
    const requests = list.reduce((s, r) => s + r.record.requests, 0);
    const elapsedMs = list.reduce((s, r) => s + r.record.elapsedMs, 0);
    const cpuKnown = list.every((r) => r.record.cpuSeconds !== undefined);
    const cpuSeconds = list.reduce((s, r) => s + (r.record.cpuSeconds ?? 0), 0);
    const systemKnown = cpuKnown && list.every((r) => r.record.cpuSystemSeconds !== undefined);
    const systemSeconds = list.reduce((s, r) => s + (r.record.cpuSystemSeconds ?? 0), 0);
    const rss = list.map((r) => r.record.rssMaxMb).filter((v): v is number => v !== undefined);
    base.set(key, {
      target: first.target,
      kind: first.kind,
      connections: first.connections,
      cache: first.cache,
      rounds: list.length,
      requests,
      rps: elapsedMs > 0 ? requests / (elapsedMs / 1000) : 0,
      latencyMs: summarize(pool(list.map((r) => r.latencyMs))),
      ttfbMs: first.kind === 'sse' ? summarize(pool(list.map((r) => r.ttfbMs))) : undefined,
      cpuUsPerRequest: cpuKnown && requests > 0 ? (cpuSeconds * 1e6) / requests : undefined,
      cpuKernelShare: systemKnown && cpuSeconds > 0 ? systemSeconds / cpuSeconds : undefined,
      rssMaxMb: rss.length > 0 ? Math.max(...rss) : undefined,
      hitRatio: requests > 0 ? list.reduce((s, r) => s + r.record.cacheHits, 0) / requests : 0,
      errors: list.reduce((s, r) => s + r.record.errors, 0),
    });
  }
  const roundCpu = new Map<string, number>();
  for (const run of runs) {
    const r = run.record;
    if (r.cpuUsPerRequest !== undefined) roundCpu.set(`${keyOf(r.target, r.kind, r.connections, r.cache)}|${r.round}`, r.cpuUsPerRequest);
  }
  const out: Aggregate[] = [];
  for (const a of base.values()) {
    // The floors and the upstream have no cache: their miss runs are the reference for both cases.
    const cpuRatios = (reference: string): { pooled: number; medianOfRounds: number; range: RoundRange | undefined } => {
      const perRound: number[] = [];
      for (const run of groups.get(keyOf(a.target, a.kind, a.connections, a.cache)) ?? []) {
        const referenceRound = roundCpu.get(`${keyOf(reference, a.kind, a.connections, 'miss')}|${run.record.round}`);
        perRound.push(ratio(run.record.cpuUsPerRequest, referenceRound));
      }
      const pooled = base.get(keyOf(reference, a.kind, a.connections, 'miss'))?.cpuUsPerRequest;
      return { pooled: ratio(a.cpuUsPerRequest, pooled), medianOfRounds: median(perRound), range: roundRange(perRound) };
    };
    const floor = cpuRatios(FLOOR);
    const parseFloor = cpuRatios(PARSE_FLOOR);
    const direct = base.get(keyOf(DIRECT, a.kind, a.connections, 'miss'));
    out.push({
      ...a,
      cpuRatioToFloor: floor.pooled,
      cpuRatioToFloorMedianOfRounds: floor.medianOfRounds,
      cpuRatioToFloorRange: floor.range,
      cpuRatioToParseFloor: parseFloor.pooled,
      cpuRatioToParseFloorMedianOfRounds: parseFloor.medianOfRounds,
      cpuRatioToParseFloorRange: parseFloor.range,
      addedP50Ms: direct ? a.latencyMs.p50 - direct.latencyMs.p50 : Number.NaN,
      addedP99Ms: direct ? a.latencyMs.p99 - direct.latencyMs.p99 : Number.NaN,
      addedTtfbP50Ms: direct?.ttfbMs && a.ttfbMs ? a.ttfbMs.p50 - direct.ttfbMs.p50 : Number.NaN,
    });
  }
  const order = (t: string): number => (REFERENCES.includes(t) ? REFERENCES.indexOf(t) : REFERENCES.length);
  return out.sort(
    (x, y) =>
      order(x.target) - order(y.target) ||
      x.target.localeCompare(y.target) ||
      x.kind.localeCompare(y.kind) ||
      y.cache.localeCompare(x.cache) ||
      x.connections - y.connections,
  );
}

/** One case of `candidate` against `baseline`, round by round. */
export interface PairedCase {
  kind: PayloadKind;
  connections: number;
  cache: CacheCase;
  /** Rounds in which both were measured. */
  rounds: number;
  /** Median over those rounds of candidate CPU/request ÷ baseline CPU/request, and their spread. */
  cpuRatio: number;
  cpuRatioRange: RoundRange | undefined;
  /** Median over those rounds of candidate p50 − baseline p50, in ms, and their spread. */
  p50DeltaMs: number;
  p50DeltaRange: RoundRange | undefined;
  /** Rounds in which the candidate spent less CPU per request than the baseline, and more. Equal rounds count for neither. */
  cpuCheaperRounds: number;
  cpuDearerRounds: number;
  /** The sign test's two-sided p for that split (stats.ts `signTestP`). */
  cpuSignP: number;
}

/**
 * `candidate` against `baseline` (a build saved with `--variant`, say), pairing each round's
 * figures with the same round's: a round measures both within seconds of each other, while this
 * machine's state moves between rounds by more than most changes are worth. This is how a
 * before/after is read; pooled figures of the two are not.
 */
export function pairedByRound(runs: readonly MeasuredRun[], candidate: string, baseline: string): PairedCase[] {
  const byRound = new Map<string, MeasuredRun['record']>();
  for (const { record: r } of runs) if (r.target === baseline) byRound.set(`${keyOf(baseline, r.kind, r.connections, r.cache)}|${r.round}`, r);
  const cases = new Map<string, { kind: PayloadKind; connections: number; cache: CacheCase; cpu: number[]; p50: number[] }>();
  for (const { record: r } of runs) {
    if (r.target !== candidate) continue;
    const base = byRound.get(`${keyOf(baseline, r.kind, r.connections, r.cache)}|${r.round}`);
    if (!base) continue;
    const key = keyOf('', r.kind, r.connections, r.cache);
    const entry = cases.get(key) ?? { kind: r.kind, connections: r.connections, cache: r.cache, cpu: [], p50: [] };
    entry.cpu.push(ratio(r.cpuUsPerRequest, base.cpuUsPerRequest));
    entry.p50.push(r.latencyMs.p50 - base.latencyMs.p50);
    cases.set(key, entry);
  }
  return [...cases.values()]
    .map((c) => {
      const cheaper = c.cpu.filter((r) => r < 1).length;
      const dearer = c.cpu.filter((r) => r > 1).length;
      return {
        kind: c.kind,
        connections: c.connections,
        cache: c.cache,
        rounds: c.cpu.length,
        cpuRatio: median(c.cpu),
        cpuRatioRange: roundRange(c.cpu),
        p50DeltaMs: median(c.p50),
        p50DeltaRange: roundRange(c.p50),
        cpuCheaperRounds: cheaper,
        cpuDearerRounds: dearer,
        cpuSignP: signTestP(cheaper, cheaper + dearer),
      };
    })
    .sort((x, y) => x.kind.localeCompare(y.kind) || y.cache.localeCompare(x.cache) || x.connections - y.connections);
}

export function pairedMarkdown(cases: readonly PairedCase[], candidate: string, baseline: string): string {
  const signed = (ms: number): string => `${ms >= 0 ? '+' : '−'}${Math.abs(ms * 1000).toFixed(0)}`;
  return [
    `| case | rounds | CPU/request, \`${candidate}\` ÷ \`${baseline}\` | CPU lower / higher in (sign test p) | p50, \`${candidate}\` − \`${baseline}\`, µs |`,
    '|---|---:|---:|---:|---:|',
    ...cases.map(
      (c) =>
        `| ${c.kind} ×${c.connections} ${c.cache} | ${c.rounds} | ${fmt(c.cpuRatio)}${spread(c.cpuRatioRange)} | ${c.cpuCheaperRounds} / ${c.cpuDearerRounds} (${fmt(c.cpuSignP)}) | ${signed(c.p50DeltaMs)}${c.p50DeltaRange ? ` [${signed(c.p50DeltaRange.min)}..${signed(c.p50DeltaRange.max)}]` : ''} |`,
    ),
  ].join('\n');
}

export interface Check {
  what: string;
  limit: string;
  measured: string;
  /** undefined: not measurable in this run (e.g. no cache yet). */
  pass: boolean | undefined;
}

export const TARGETS = { cpuRatio: 2.5, cacheHitCpuRatio: 1.3, addedP50Ms: 0.5, addedTtfbMs: 1, rssMb: 200 } as const;

const fmt = (n: number | undefined, digits = 2): string => (n === undefined || !Number.isFinite(n) ? 'n/a' : n.toFixed(digits));

/**
 * The per-round spread beside a pooled ratio. The verdict stays on the pooled figure; the spread
 * shows whether one round of this noisy machine would have said otherwise.
 */
const spread = (range: RoundRange | undefined): string => (range ? ` [${fmt(range.min)}–${fmt(range.max)}]` : '');

/** The issue's targets, checked for one gateway target (production, embedded or a variant). */
export function checkTargets(aggregates: readonly Aggregate[], target: string): Check[] {
  const mine = aggregates.filter((a) => a.target === target);
  const pick = (kind: PayloadKind, cache: CacheCase): Aggregate[] =>
    mine.filter((a) => a.kind === kind && a.cache === cache).sort((x, y) => x.connections - y.connections);
  const checks: Check[] = [];
  for (const kind of ['json', 'sse'] as const) {
    const rows = pick(kind, 'miss');
    if (rows.length === 0) continue;
    const worst = Math.max(...rows.map((r) => r.cpuRatioToFloor));
    checks.push({
      what: `CPU/request ÷ floor, full pipeline, ${kind.toUpperCase()} (cache miss)`,
      limit: `≤ ${TARGETS.cpuRatio}×`,
      measured: rows.map((r) => `×${r.connections}: ${fmt(r.cpuRatioToFloor)}${spread(r.cpuRatioToFloorRange)}`).join(' · '),
      pass: Number.isFinite(worst) ? worst <= TARGETS.cpuRatio : undefined,
    });
  }
  // Issue #7 states the hit target against the floor, issue #6 against the parse floor (a proxy
  // that parses and reads usage); the same rows, two references.
  const hitChecks = (reference: string, ratioOf: (r: Aggregate) => number, rangeOf: (r: Aggregate) => RoundRange | undefined, suffix: string): void => {
    for (const kind of ['json', 'sse'] as const) {
      const rows = pick(kind, 'hit');
      if (rows.length === 0) continue;
      const active = rows.some((r) => r.hitRatio > 0);
      const worst = Math.max(...rows.map(ratioOf));
      checks.push({
        what: `CPU/request ÷ ${reference}, cache hit, ${kind.toUpperCase()}${suffix}`,
        limit: `≤ ${TARGETS.cacheHitCpuRatio}×`,
        measured: active
          ? rows.map((r) => `×${r.connections}: ${fmt(ratioOf(r))}${spread(rangeOf(r))} (hits ${(100 * r.hitRatio).toFixed(0)}%)`).join(' · ')
          : 'cache not active (no `x-gateway-cache: hit`)',
        // Not measurable (rather than missed) when the run had no such reference (--targets without it).
        pass: active && Number.isFinite(worst) ? worst <= TARGETS.cacheHitCpuRatio : undefined,
      });
    }
  };
  hitChecks('floor', (r) => r.cpuRatioToFloor, (r) => r.cpuRatioToFloorRange, '');
  hitChecks('parse floor', (r) => r.cpuRatioToParseFloor, (r) => r.cpuRatioToParseFloorRange, ' (issue #6)');
  const json1 = mine.find((a) => a.kind === 'json' && a.cache === 'miss' && a.connections === 1);
  if (json1) {
    checks.push({
      what: 'p50 latency added at 1 connection, JSON (vs direct)',
      limit: `≤ ${TARGETS.addedP50Ms} ms`,
      measured: `+${fmt(json1.addedP50Ms, 3)} ms (p99 +${fmt(json1.addedP99Ms, 3)} ms)`,
      pass: Number.isFinite(json1.addedP50Ms) ? json1.addedP50Ms <= TARGETS.addedP50Ms : undefined,
    });
  }
  const sse1 = mine.find((a) => a.kind === 'sse' && a.cache === 'miss' && a.connections === 1);
  if (sse1) {
    checks.push({
      what: 'SSE time to first byte added at 1 connection, p50 (vs direct)',
      limit: `≤ ${TARGETS.addedTtfbMs} ms`,
      measured: `+${fmt(sse1.addedTtfbP50Ms, 3)} ms`,
      pass: Number.isFinite(sse1.addedTtfbP50Ms) ? sse1.addedTtfbP50Ms <= TARGETS.addedTtfbMs : undefined,
    });
  }
  const rss = mine.map((a) => a.rssMaxMb).filter((v): v is number => v !== undefined);
  if (rss.length > 0) {
    const max = Math.max(...rss);
    const at = mine.find((a) => a.rssMaxMb === max);
    checks.push({
      what: 'RSS under load (largest sample)',
      limit: `≤ ${TARGETS.rssMb} MB`,
      measured: `${max.toFixed(0)} MB${at ? ` (${at.kind} ×${at.connections} ${at.cache})` : ''}`,
      pass: max <= TARGETS.rssMb,
    });
  }
  return checks;
}

export function checksMarkdown(checks: readonly Check[]): string {
  const mark = (p: boolean | undefined): string => (p === undefined ? '—' : p ? 'pass' : '**MISS**');
  return ['| target | limit | measured | |', '|---|---|---|---|', ...checks.map((c) => `| ${c.what} | ${c.limit} | ${c.measured} | ${mark(c.pass)} |`)].join(
    '\n',
  );
}

export function aggregatesMarkdown(aggregates: readonly Aggregate[]): string {
  const header =
    '| target | case | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | TTFB p50 ms | +TTFB ms | CPU µs/req | in kernel | ÷ floor | ÷ parse floor | RSS MB | cache hits |\n' +
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|';
  const rows = aggregates.map((a) => {
    const isRef = a.target === DIRECT;
    const hits = REFERENCES.includes(a.target) ? '' : a.cache === 'hit' && a.hitRatio === 0 ? 'cache not active' : `${(100 * a.hitRatio).toFixed(0)}%`;
    return [
      a.target,
      `${a.kind} ×${a.connections} ${a.cache}`,
      a.rps.toFixed(0),
      fmt(a.latencyMs.p50, 3),
      fmt(a.latencyMs.p99, 3),
      isRef ? '' : fmt(a.addedP50Ms, 3),
      isRef ? '' : fmt(a.addedP99Ms, 3),
      a.ttfbMs ? fmt(a.ttfbMs.p50, 3) : '',
      a.ttfbMs && !isRef ? fmt(a.addedTtfbP50Ms, 3) : '',
      fmt(a.cpuUsPerRequest, 0),
      a.cpuKernelShare === undefined ? '' : `${(100 * a.cpuKernelShare).toFixed(0)}%`,
      a.target === FLOOR || isRef ? '' : fmt(a.cpuRatioToFloor),
      REFERENCES.includes(a.target) ? '' : fmt(a.cpuRatioToParseFloor),
      fmt(a.rssMaxMb, 0),
      hits,
    ].join(' | ');
  });
  return [header, ...rows.map((r) => `| ${r} |`)].join('\n');
}

/** Replaces the generated section of BENCHMARKS.md (between markers), leaving the prose alone. */
export function replaceSection(document: string, section: string, start = '<!-- bench:latest:start -->', end = '<!-- bench:latest:end -->'): string {
  const block = `${start}\n${section.trim()}\n${end}`;
  const from = document.indexOf(start);
  const to = document.indexOf(end);
  if (from === -1 || to === -1 || to < from) return `${document.trimEnd()}\n\n${block}\n`;
  return `${document.slice(0, from)}${block}${document.slice(to + end.length)}`;
}
