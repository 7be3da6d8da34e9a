/**
 * One measured run: read the stub's hit counter, drive the target, read it again, and refuse the
 * run unless every request succeeded and every request that was not a cache hit reached the
 * stub exactly once. A benchmark that quietly measures error pages or a short-circuit proves
 * nothing, so these failures stop the whole bench with a non-zero exit.
 */
import type { BodyMode, LoadResult, LoadSpec, PayloadKind } from './load.js';
import type { LoadRunner } from './processes.js';
import { type LatencySummary, summarize } from './stats.js';

export class BenchFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BenchFailure';
  }
}

/** The stub's chat-completion hit counter (GET /__stub/stats). */
export interface StubCounter {
  hits(): Promise<number>;
}

export function httpStubCounter(stubOrigin: string): StubCounter {
  return {
    async hits() {
      const res = await fetch(`${stubOrigin}/__stub/stats`);
      if (res.status !== 200) throw new BenchFailure(`stub stats answered HTTP ${res.status}`);
      const body = (await res.json()) as { hits?: unknown };
      if (typeof body.hits !== 'number') throw new BenchFailure('stub stats without a hit count');
      return body.hits;
    },
  };
}

export type CacheCase = 'miss' | 'hit';

export interface BenchCase {
  kind: PayloadKind;
  connections: number;
  cache: CacheCase;
}

export function caseLabel(c: BenchCase): string {
  return `${c.kind} ×${c.connections} ${c.cache}`;
}

export interface BenchTarget {
  /** direct | floor | gateway | embedded | gateway-semi16 … */
  name: string;
  /** Full URL of the chat completions endpoint. */
  endpoint: string;
  headers: Record<string, string>;
  /** The model named in the body; undefined lets the gateway's routing table choose. */
  model: string | undefined;
  /** The serving process (undefined for the stub itself, whose CPU is not the point). */
  pid: number | undefined;
}

export interface Timing {
  warmupMs: number;
  durationMs: number;
  timeoutMs: number;
  /** Count-bounded instead (tests): this many measured requests after warmupRequests. */
  requests?: number;
  warmupRequests?: number;
}

/** What a run produced, as written to the JSON lines file (samples are kept aside for pooling). */
export interface RunRecord {
  type: 'run';
  round: number;
  target: string;
  kind: PayloadKind;
  connections: number;
  cache: CacheCase;
  requests: number;
  elapsedMs: number;
  rps: number;
  latencyMs: LatencySummary;
  ttfbMs: LatencySummary | undefined;
  cpuSeconds: number | undefined;
  /** The part of cpuSeconds spent in the kernel; absent in results written before it was recorded. */
  cpuSystemSeconds?: number;
  cpuUsPerRequest: number | undefined;
  rssMaxMb: number | undefined;
  rssHwmMb: number | undefined;
  cacheHits: number;
  hitRatio: number;
  errors: number;
  completed: number;
  stubHits: number;
  sampleHeaders: Record<string, string>;
  sends: LoadResult['sends'];
}

export interface MeasuredRun {
  record: RunRecord;
  latencyMs: number[];
  ttfbMs: number[];
}

/** Throws BenchFailure unless the run is trustworthy (see the file comment). */
export function verifyRun(what: string, result: LoadResult, stubHits: number): void {
  if (result.targetGone) throw new BenchFailure(`${what}: the serving process exited during the run`);
  if (result.errors > 0) {
    throw new BenchFailure(`${what}: ${result.errors} of ${result.completed} requests failed, e.g.\n  ${result.errorSamples.join('\n  ')}`);
  }
  if (result.completed === 0 || result.measured.requests === 0) {
    throw new BenchFailure(`${what}: no request completed in the measured window`);
  }
  const expected = result.completed - result.cacheHitsTotal;
  if (stubHits !== expected) {
    throw new BenchFailure(
      `${what}: the stub upstream counted ${stubHits} chat requests, but ${expected} responses ` +
        `(${result.completed} completed − ${result.cacheHitsTotal} cache hits) should have reached it`,
    );
  }
}

export interface MeasureInput {
  round: number;
  target: BenchTarget;
  benchCase: BenchCase;
  timing: Timing;
  stub: StubCounter;
  load: LoadRunner;
  /** Unique per run, so distinct bodies never repeat (a shared Redis cache outlives runs). */
  tag: string;
  /** Also count the target's TCP sends per peer during the window (round trips per stage). */
  countSends?: boolean;
}

export async function measureCase(input: MeasureInput): Promise<MeasuredRun> {
  const { target, benchCase, timing } = input;
  const bodyMode: BodyMode = benchCase.cache === 'hit' ? 'identical' : 'distinct';
  const spec: LoadSpec = {
    url: target.endpoint,
    headers: target.headers,
    kind: benchCase.kind,
    bodyMode,
    model: target.model,
    tag: input.tag,
    connections: benchCase.connections,
    ...(timing.requests === undefined
      ? { warmupMs: timing.warmupMs, durationMs: timing.durationMs }
      : { warmupRequests: timing.warmupRequests ?? 0, requests: timing.requests }),
    timeoutMs: timing.timeoutMs,
    targetPid: target.pid,
    countSends: input.countSends,
  };
  const before = await input.stub.hits();
  const result = await input.load(spec);
  const stubHits = (await input.stub.hits()) - before;
  verifyRun(`${target.name} ${caseLabel(benchCase)}`, result, stubHits);
  return { record: toRecord(input, result, stubHits), latencyMs: result.measured.latencyMs, ttfbMs: result.measured.ttfbMs };
}

function toRecord(input: MeasureInput, result: LoadResult, stubHits: number): RunRecord {
  const { measured } = result;
  const requests = measured.requests;
  const mb = (kb: number | undefined): number | undefined => (kb === undefined ? undefined : kb / 1024);
  return {
    type: 'run',
    round: input.round,
    target: input.target.name,
    kind: input.benchCase.kind,
    connections: input.benchCase.connections,
    cache: input.benchCase.cache,
    requests,
    elapsedMs: measured.elapsedMs,
    rps: measured.elapsedMs > 0 ? requests / (measured.elapsedMs / 1000) : 0,
    latencyMs: summarize(measured.latencyMs),
    ttfbMs: input.benchCase.kind === 'sse' ? summarize(measured.ttfbMs) : undefined,
    cpuSeconds: result.cpuSeconds,
    cpuSystemSeconds: result.cpuSystemSeconds,
    cpuUsPerRequest: result.cpuSeconds === undefined ? undefined : (result.cpuSeconds * 1e6) / requests,
    rssMaxMb: mb(result.rssMaxKb),
    rssHwmMb: mb(result.rssHwmKb),
    cacheHits: measured.cacheHits,
    hitRatio: requests > 0 ? measured.cacheHits / requests : 0,
    errors: result.errors,
    completed: result.completed,
    stubHits,
    sampleHeaders: result.sampleHeaders,
    sends: result.sends,
  };
}
