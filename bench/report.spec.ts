import { describe, expect, it } from 'vitest';
import type { MeasuredRun, RunRecord } from './measure.js';
import { aggregate, checkTargets, replaceSection } from './report.js';
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
