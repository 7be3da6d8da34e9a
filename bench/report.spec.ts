import { describe, expect, it } from 'vitest';
import type { MeasuredRun, RunRecord } from './measure.js';
import { aggregate, aggregatesMarkdown, checkTargets, pairedByRound, pairedMarkdown, replaceSection } from './report.js';
import { summarize } from './stats.js';

function run(target: string, over: Partial<RunRecord> & { latency: number[]; round?: number }): MeasuredRun {
  const { latency, ...rest } = over;
  const record: RunRecord = {
    type: 'run',
    round: over.round ?? 1,
    target,
    kind: 'json',
    connections: 1,
    cache: 'miss',
    requests: 100,
    elapsedMs: 1000,
    rps: 100,
    latencyMs: summarize(latency),
    ttfbMs: undefined,
    cpuSeconds: undefined,
    cpuUsPerRequest: undefined,
    rssMaxMb: undefined,
    rssHwmMb: undefined,
    cacheHits: 0,
    hitRatio: 0,
    errors: 0,
    completed: 100,
    stubHits: 100,
    sampleHeaders: {},
    sends: undefined,
    ...rest,
  };
  return { record, latencyMs: latency, ttfbMs: [] };
}

describe('aggregate', () => {
  const runs = [
    run('direct', { latency: [0.1, 0.1, 0.1] }),
    run('floor', { latency: [0.3, 0.3, 0.3], cpuSeconds: 0.01, cpuUsPerRequest: 100 }),
    run('floor', { latency: [0.3], cpuSeconds: 0.03, cpuUsPerRequest: 300, round: 2 }),
    run('gateway', { latency: [0.5, 0.5, 0.5], cpuSeconds: 0.02, cpuUsPerRequest: 200, rssMaxMb: 150 }),
    run('gateway', { latency: [0.5], cpuSeconds: 0.06, cpuUsPerRequest: 600, rssMaxMb: 190, round: 2 }),
    run('gateway', { cache: 'hit', latency: [0.2], cpuSeconds: 0.012, cpuUsPerRequest: 120, cacheHits: 0, hitRatio: 0 }),
  ];
  const result = aggregate(runs);
  const gateway = result.find((a) => a.target === 'gateway' && a.cache === 'miss');

  it('pools CPU over rounds and divides by the floor of the same kind and connections', () => {
    expect(gateway?.cpuUsPerRequest).toBeCloseTo(400);
    expect(gateway?.cpuRatioToFloor).toBeCloseTo(2);
    expect(gateway?.cpuRatioToFloorMedianOfRounds).toBeCloseTo(2);
  });

  it('reports latency added over the upstream called directly', () => {
    expect(gateway?.addedP50Ms).toBeCloseTo(0.4);
    expect(result.find((a) => a.target === 'floor')?.addedP50Ms).toBeCloseTo(0.2);
  });

  it('reports the kernel’s share of the CPU pooled over rounds, weighted by each round’s CPU, and only when every round recorded it', () => {
    const split = aggregate([
      run('floor', { latency: [0.3], cpuSeconds: 0.01, cpuSystemSeconds: 0.002, cpuUsPerRequest: 100 }),
      run('floor', { latency: [0.3], cpuSeconds: 0.01, cpuUsPerRequest: 100, round: 2 }),
      run('gateway', { latency: [0.5], cpuSeconds: 0.02, cpuSystemSeconds: 0.002, cpuUsPerRequest: 200 }),
      run('gateway', { latency: [0.5], cpuSeconds: 0.06, cpuSystemSeconds: 0.018, cpuUsPerRequest: 600, round: 2 }),
    ]);
    const pooled = split.find((a) => a.target === 'gateway');
    expect(pooled?.cpuKernelShare).toBeCloseTo(0.25);
    expect(aggregatesMarkdown(split)).toMatch(/\| 400 \| 25% \| 4\.00 \|/);
    // A round from results written before the split was recorded: the pooled share would be a guess.
    expect(split.find((a) => a.target === 'floor')?.cpuKernelShare).toBeUndefined();
  });

  it('takes the largest RSS sample across rounds', () => {
    expect(gateway?.rssMaxMb).toBe(190);
  });

  it('compares cache hits with the floor’s miss runs', () => {
    expect(result.find((a) => a.target === 'gateway' && a.cache === 'hit')?.cpuRatioToFloor).toBeCloseTo(0.6);
  });

  it('checks the targets, calling a cache without hits "not active" instead of passing it', () => {
    const checks = checkTargets(result, 'gateway');
    const cpu = checks.find((c) => c.what.startsWith('CPU/request ÷ floor, full pipeline, JSON'));
    expect(cpu?.pass).toBe(true);
    const hit = checks.find((c) => c.what.includes('cache hit'));
    expect(hit?.pass).toBeUndefined();
    expect(hit?.measured).toMatch(/cache not active/);
    expect(checks.find((c) => c.what.startsWith('p50 latency added'))?.pass).toBe(true);
    expect(checks.find((c) => c.what.startsWith('RSS'))?.pass).toBe(true);
  });

  it('fails a check that is over its limit', () => {
    const slow = aggregate([
      run('direct', { latency: [0.1] }),
      run('floor', { latency: [0.3], cpuSeconds: 0.01, cpuUsPerRequest: 100 }),
      run('gateway', { latency: [0.9], cpuSeconds: 0.03, cpuUsPerRequest: 300, rssMaxMb: 250 }),
    ]);
    const checks = checkTargets(slow, 'gateway');
    expect(checks.find((c) => c.what.startsWith('CPU/request ÷ floor, full pipeline, JSON'))?.pass).toBe(false);
    expect(checks.find((c) => c.what.startsWith('p50 latency added'))?.pass).toBe(false);
    expect(checks.find((c) => c.what.startsWith('RSS'))?.pass).toBe(false);
  });
});

describe('the parse floor as a second CPU reference', () => {
  const hit = (kind: 'json' | 'sse', connections: number, cpuUsPerRequest: number, round = 1) =>
    run('gateway', { kind, connections, cache: 'hit', latency: [0.2], cpuSeconds: cpuUsPerRequest / 1e4, cpuUsPerRequest, cacheHits: 100, hitRatio: 1, round });
  const ref = (target: string, kind: 'json' | 'sse', connections: number, cpuUsPerRequest: number, round = 1) =>
    run(target, { kind, connections, latency: [0.3], cpuSeconds: cpuUsPerRequest / 1e4, cpuUsPerRequest, round });
  const runs = [
    run('direct', { latency: [0.1] }),
    ref('floor', 'json', 1, 100),
    ref('parse floor', 'json', 1, 150),
    ref('parse floor', 'json', 1, 250, 2),
    hit('json', 1, 150),
    hit('json', 1, 250, 2),
    ref('floor', 'sse', 16, 100),
    ref('parse floor', 'sse', 16, 100),
    hit('sse', 16, 140),
  ];
  const result = aggregate(runs);

  it('divides a cache hit by the parse floor’s miss runs of the same kind and connections, pooled over rounds', () => {
    const json = result.find((a) => a.target === 'gateway' && a.kind === 'json');
    expect(json?.cpuRatioToParseFloor).toBeCloseTo(200 / 200);
    expect(json?.cpuRatioToFloor).toBeCloseTo(200 / 100);
    expect(json?.cpuRatioToParseFloorMedianOfRounds).toBeCloseTo(1);
    expect(result.find((a) => a.target === 'gateway' && a.kind === 'sse')?.cpuRatioToParseFloor).toBeCloseTo(1.4);
  });

  it('adds issue #6 rows next to the floor rows, which stay as they were', () => {
    const checks = checkTargets(result, 'gateway');
    expect(checks.map((c) => c.what)).toEqual([
      'CPU/request ÷ floor, cache hit, JSON',
      'CPU/request ÷ floor, cache hit, SSE',
      'CPU/request ÷ parse floor, cache hit, JSON (issue #6)',
      'CPU/request ÷ parse floor, cache hit, SSE (issue #6)',
    ]);
    const json = checks.find((c) => c.what.startsWith('CPU/request ÷ parse floor, cache hit, JSON'));
    expect(json).toMatchObject({ limit: '≤ 1.3×', measured: '×1: 1.00 [1.00–1.00] (hits 100%)', pass: true });
    expect(checks.find((c) => c.what.startsWith('CPU/request ÷ parse floor, cache hit, SSE'))).toMatchObject({
      measured: '×16: 1.40 (hits 100%)',
      pass: false,
    });
    expect(checks.find((c) => c.what === 'CPU/request ÷ floor, cache hit, JSON')?.pass).toBe(false);
  });

  it('shows the spread of the per-round ratios beside the pooled one, and keeps the verdict on the pooled one', () => {
    // Round 1: 130 ÷ 100 = 1.3; round 2: 240 ÷ 150 = 1.6; pooled 370 ÷ 250 = 1.48.
    const spreadRuns = [
      run('direct', { latency: [0.1] }),
      ref('floor', 'json', 16, 100),
      ref('floor', 'json', 16, 150, 2),
      ref('parse floor', 'json', 16, 100),
      ref('parse floor', 'json', 16, 150, 2),
      hit('json', 16, 130),
      hit('json', 16, 240, 2),
    ];
    const aggregated = aggregate(spreadRuns).find((a) => a.target === 'gateway');
    expect(aggregated?.cpuRatioToFloorRange).toEqual({ min: 1.3, max: 1.6 });
    expect(aggregated?.cpuRatioToFloorMedianOfRounds).toBeCloseTo(1.45);
    const row = checkTargets(aggregate(spreadRuns), 'gateway').find((c) => c.what === 'CPU/request ÷ floor, cache hit, JSON');
    expect(row).toMatchObject({ measured: '×16: 1.48 [1.30–1.60] (hits 100%)', pass: false });
  });

  it('calls the issue #6 rows not measurable when the run had no parse floor', () => {
    const checks = checkTargets(aggregate(runs.filter((r) => r.record.target !== 'parse floor')), 'gateway');
    const row = checks.find((c) => c.what.startsWith('CPU/request ÷ parse floor, cache hit, JSON'));
    expect(row?.pass).toBeUndefined();
    expect(row?.measured).toBe('×1: n/a (hits 100%)');
  });

  it('shows a ÷ parse floor column, blank for the references, and the parse floor’s own cost over the floor', () => {
    const lines = aggregatesMarkdown(result).split('\n');
    const header = lines[0].split('|').map((c) => c.trim());
    const column = header.indexOf('÷ parse floor');
    expect(column).toBe(header.indexOf('÷ floor') + 1);
    const cell = (target: string, kase: string, name: string): string | undefined =>
      lines
        .find((l) => l.startsWith(`| ${target} | ${kase} |`))
        ?.split('|')
        .map((c) => c.trim())[header.indexOf(name)];
    expect(cell('gateway', 'sse ×16 hit', '÷ parse floor')).toBe('1.40');
    expect(cell('parse floor', 'json ×1 miss', '÷ parse floor')).toBe('');
    expect(cell('parse floor', 'json ×1 miss', '÷ floor')).toBe('2.00');
    expect(cell('floor', 'json ×1 miss', '÷ parse floor')).toBe('');
    // References first, in the order direct, floor, parse floor.
    expect(lines.slice(2).map((l) => l.split('|')[1].trim())).toEqual(['direct', 'floor', 'floor', 'parse floor', 'parse floor', 'gateway', 'gateway']);
  });
});

describe('pairedByRound', () => {
  // Round 2 is ten times slower for both builds: pooled, it alone would decide the comparison;
  // paired, it is one round of three, each against its own round of the baseline.
  const runs = [
    run('before', { latency: [0.5], cpuUsPerRequest: 100, round: 1 }),
    run('after', { latency: [0.4], cpuUsPerRequest: 90, round: 1 }),
    run('before', { latency: [1.5], cpuUsPerRequest: 1000, round: 2 }),
    run('after', { latency: [1.3], cpuUsPerRequest: 900, round: 2 }),
    run('before', { latency: [0.6], cpuUsPerRequest: 100, round: 3 }),
    run('after', { latency: [0.6], cpuUsPerRequest: 50, round: 3 }),
    // A case the baseline did not run in this round: nothing to pair it with.
    run('after', { cache: 'hit', latency: [0.2], cpuUsPerRequest: 40, round: 1 }),
    run('before', { cache: 'hit', latency: [0.2], cpuUsPerRequest: 40, round: 2 }),
  ];

  it('pairs each round with the same round of the baseline: median ratio and p50 difference, with their spread', () => {
    const [miss, ...rest] = pairedByRound(runs, 'after', 'before');
    expect(rest).toEqual([]);
    expect(miss).toMatchObject({ kind: 'json', connections: 1, cache: 'miss', rounds: 3 });
    expect(miss?.cpuRatio).toBeCloseTo(0.9);
    expect(miss?.cpuRatioRange?.min).toBeCloseTo(0.5);
    expect(miss?.cpuRatioRange?.max).toBeCloseTo(0.9);
    expect(miss?.p50DeltaMs).toBeCloseTo(-0.1);
    expect(miss?.p50DeltaRange?.min).toBeCloseTo(-0.2);
    expect(miss?.p50DeltaRange?.max).toBeCloseTo(0);
    // Cheaper in all three rounds: a fair coin does that (or its mirror) in 2 of 8 tosses of three.
    expect(miss).toMatchObject({ cpuCheaperRounds: 3, cpuDearerRounds: 0 });
    expect(miss?.cpuSignP).toBeCloseTo(0.25);
  });

  it('counts a round of equal CPU neither as lower nor as higher', () => {
    const [only] = pairedByRound(
      [
        run('before', { latency: [0.5], cpuUsPerRequest: 100, round: 1 }),
        run('after', { latency: [0.5], cpuUsPerRequest: 100, round: 1 }),
        run('before', { latency: [0.5], cpuUsPerRequest: 100, round: 2 }),
        run('after', { latency: [0.5], cpuUsPerRequest: 120, round: 2 }),
      ],
      'after',
      'before',
    );
    expect(only).toMatchObject({ rounds: 2, cpuCheaperRounds: 0, cpuDearerRounds: 1, cpuSignP: 1 });
  });

  it('renders one row per case, p50 in signed µs', () => {
    const table = pairedMarkdown(pairedByRound(runs, 'after', 'before'), 'after', 'before');
    expect(table.split('\n')).toEqual([
      '| case | rounds | CPU/request, `after` ÷ `before` | CPU lower / higher in (sign test p) | p50, `after` − `before`, µs |',
      '|---|---:|---:|---:|---:|',
      '| json ×1 miss | 3 | 0.90 [0.50–0.90] | 3 / 0 (0.25) | −100 [−200..+0] |',
    ]);
  });
});

describe('replaceSection', () => {
  it('replaces only the generated block and keeps the prose around it', () => {
    const doc = '# B\n\nintro\n\n<!-- bench:latest:start -->\nold\n<!-- bench:latest:end -->\n\n## Profile\nnotes\n';
    const next = replaceSection(doc, 'new table');
    expect(next).toBe('# B\n\nintro\n\n<!-- bench:latest:start -->\nnew table\n<!-- bench:latest:end -->\n\n## Profile\nnotes\n');
  });

  it('appends the block when the document has none yet', () => {
    expect(replaceSection('# B\n', 'x')).toBe('# B\n\n<!-- bench:latest:start -->\nx\n<!-- bench:latest:end -->\n');
  });
});
