/**
 * Closed-loop load generator: N keep-alive connections, each sending its next request as soon
 * as the previous response has fully arrived. Runs in its own child process (load-worker.ts) in
 * the benchmark so it never shares an event loop with what it measures; tests call runLoad()
 * in-process against small fakes.
 *
 * Every response is checked (status 200, a JSON body with choices, or an SSE stream ending with
 * [DONE] and carrying no error event); anything else counts as an error, and the caller fails
 * the run on any error.
 */
import { performance } from 'node:perf_hooks';
import { Client } from 'undici';
import { type CpuTicks, cpuSecondsBetween, clockTicksPerSecond, readCpuTicks, readMemory, systemSecondsBetween } from './proc.js';
import { type SocketSends, sendsBetween, snapshotSends } from './roundtrips.js';

export type PayloadKind = 'json' | 'sse';
export type BodyMode = 'distinct' | 'identical';

export interface LoadSpec {
  /** Full URL of the chat completions endpoint. */
  url: string;
  headers: Record<string, string>;
  kind: PayloadKind;
  /** distinct: every body differs (a cache can never hit); identical: one deterministic body. */
  bodyMode: BodyMode;
  /** Include `model` in the body (the upstream and the floor need it; the gateway routes without it). */
  model: string | undefined;
  /** Unique per run so distinct bodies never repeat across runs (a shared Redis cache outlives them). */
  tag: string;
  connections: number;
  /** Either a time-bounded run (warmupMs + durationMs) or a count-bounded one (warmupRequests + requests). */
  warmupMs?: number;
  durationMs?: number;
  warmupRequests?: number;
  requests?: number;
  /** Per-request bound: a request slower than this is an error (the run must never hang). */
  timeoutMs: number;
  /** The serving process to read CPU and RSS of, bracketing exactly the measured window. */
  targetPid?: number;
  /** RSS sampling period during the measured window. */
  rssSampleMs?: number;
  /** Read targetPid's TCP send counters (ss) at the edges of the measured window. */
  countSends?: boolean;
}

export interface LoadResult {
  /** Requests with a finished outcome (success or error), warm-up included. */
  completed: number;
  errors: number;
  /** The first few errors, for the failure message. */
  errorSamples: string[];
  /** Successful responses that said `x-gateway-cache: hit`, warm-up included (they never reach the upstream). */
  cacheHitsTotal: number;
  /** The measured window only. */
  measured: {
    requests: number;
    elapsedMs: number;
    cacheHits: number;
    /** Full response time per request (ms). */
    latencyMs: number[];
    /** SSE only: time to the first body byte (ms). */
    ttfbMs: number[];
  };
  /** CPU of targetPid during the measured window, and the part of it spent in the kernel. */
  cpuSeconds: number | undefined;
  cpuSystemSeconds: number | undefined;
  /** Largest RSS of targetPid sampled during the measured window, and its lifetime peak at the end. */
  rssMaxKb: number | undefined;
  rssHwmKb: number | undefined;
  /** Response headers of the first successful response (what stages answered, e.g. x-ratelimit-*). */
  sampleHeaders: Record<string, string>;
  /** targetPid vanished while it was being measured (it crashed or was killed). */
  targetGone: boolean;
  /** With countSends: data segments targetPid sent per peer port in the window; `client` = to the load generator. */
  sends: { byPeerPort: Record<string, number>; client: number; closedSockets: number } | undefined;
}

const PROMPT_FILLER =
  'Summarise the following paragraph in one sentence for a status report. The quarterly numbers show steady growth in ' +
  'every region, with support tickets down and onboarding time shorter than last year.';

/** Builds bodies as prefix + sequence + suffix: one string concatenation per request, no stringify. */
export function bodyFactory(spec: Pick<LoadSpec, 'kind' | 'bodyMode' | 'model' | 'tag'>): (seq: number) => string {
  const head: Record<string, unknown> = {};
  if (spec.model !== undefined) head.model = spec.model;
  const stream = spec.kind === 'sse' ? ',"stream":true,"stream_options":{"include_usage":true}' : '';
  const open = `${JSON.stringify(head).slice(0, -1)}${spec.model !== undefined ? ',' : ''}"messages":[{"role":"user","content":`;
  if (spec.bodyMode === 'identical') {
    const fixed = `${open}${JSON.stringify(`bench ${spec.kind} identical. ${PROMPT_FILLER}`)}}]${stream}}`;
    return () => fixed;
  }
  const prefix = `${open}"bench ${spec.tag} #`;
  const suffix = `. ${PROMPT_FILLER}"}]${stream}}`;
  return (seq) => `${prefix}${seq}${suffix}`;
}

interface Phase {
  measuring: boolean;
  stopped: boolean;
}

/** Runs one load case and resolves with everything measured; never rejects for request failures. */
export async function runLoad(spec: LoadSpec): Promise<LoadResult> {
  const timeBased = spec.durationMs !== undefined;
  if (!timeBased && spec.requests === undefined) throw new Error('LoadSpec needs durationMs or requests');
  const url = new URL(spec.url);
  const path = `${url.pathname}${url.search}`;
  const makeBody = bodyFactory(spec);
  const headers = { 'content-type': 'application/json', accept: spec.kind === 'sse' ? 'text/event-stream' : 'application/json', ...spec.headers };
  const ticksPerSecond = clockTicksPerSecond();

  const result: LoadResult = {
    completed: 0,
    errors: 0,
    errorSamples: [],
    cacheHitsTotal: 0,
    measured: { requests: 0, elapsedMs: 0, cacheHits: 0, latencyMs: [], ttfbMs: [] },
    cpuSeconds: undefined,
    cpuSystemSeconds: undefined,
    rssMaxKb: undefined,
    rssHwmKb: undefined,
    sampleHeaders: {},
    targetGone: false,
    sends: undefined,
  };
  let sendsStart: SocketSends[] | undefined;
  const phase: Phase = { measuring: false, stopped: false };
  let cpuStart: CpuTicks | undefined;
  let measureStart = 0;
  let rssTimer: NodeJS.Timeout | undefined;
  let issued = 0;
  let sawSuccess = false;
  const warmupRequests = spec.warmupRequests ?? 0;
  const totalRequests = warmupRequests + (spec.requests ?? 0);

  const sampleRss = (): void => {
    if (spec.targetPid === undefined) return;
    try {
      const { rssKb } = readMemory(spec.targetPid);
      result.rssMaxKb = Math.max(result.rssMaxKb ?? 0, rssKb);
    } catch {
      // The process is gone; the run fails on the errors its requests get.
    }
  };
  const startMeasuring = (): void => {
    if (phase.measuring || phase.stopped) return;
    phase.measuring = true;
    measureStart = performance.now();
    if (spec.targetPid !== undefined) {
      try {
        if (spec.countSends) sendsStart = snapshotSends(spec.targetPid);
        cpuStart = readCpuTicks(spec.targetPid);
      } catch {
        result.targetGone = true;
        return;
      }
      sampleRss();
      rssTimer = setInterval(sampleRss, spec.rssSampleMs ?? 200);
    }
  };
  const stopMeasuring = (): void => {
    if (phase.stopped) return;
    phase.stopped = true;
    result.measured.elapsedMs = phase.measuring ? performance.now() - measureStart : 0;
    if (rssTimer) clearInterval(rssTimer);
    if (spec.targetPid !== undefined && cpuStart !== undefined) {
      let cpuEnd: CpuTicks;
      try {
        cpuEnd = readCpuTicks(spec.targetPid);
      } catch {
        // Its requests fail too; the caller reports the exit with the process's stderr.
        result.targetGone = true;
        return;
      }
      result.cpuSeconds = cpuSecondsBetween(cpuStart, cpuEnd, ticksPerSecond);
      result.cpuSystemSeconds = systemSecondsBetween(cpuStart, cpuEnd, ticksPerSecond);
      if (sendsStart !== undefined) {
        // Read before the clients close: their server-side sockets vanish from ss afterwards.
        const end = snapshotSends(spec.targetPid);
        const { byPeer, closedSockets } = sendsBetween(sendsStart, end);
        const clientPort = Number(url.port);
        const client = sendsBetween(
          sendsStart.filter((x) => x.localPort === clientPort),
          end.filter((x) => x.localPort === clientPort),
        );
        let toClient = 0;
        for (const n of client.byPeer.values()) toClient += n;
        for (const port of client.byPeer.keys()) byPeer.delete(port);
        result.sends = { byPeerPort: Object.fromEntries([...byPeer].map(([port, n]) => [String(port), n])), client: toClient, closedSockets };
      }
      sampleRss();
      try {
        result.rssHwmKb = readMemory(spec.targetPid).hwmKb;
      } catch {
        result.targetGone = true;
      }
    }
  };

  const timers: NodeJS.Timeout[] = [];
  if (timeBased) {
    timers.push(setTimeout(startMeasuring, spec.warmupMs ?? 0));
    timers.push(setTimeout(stopMeasuring, (spec.warmupMs ?? 0) + (spec.durationMs as number)));
  } else if (warmupRequests === 0) {
    startMeasuring();
  }

  const onOutcome = (ok: boolean, latency: number, ttfb: number, hit: boolean): void => {
    result.completed++;
    if (!ok) result.errors++;
    if (ok && hit) result.cacheHitsTotal++;
    if (phase.measuring && !phase.stopped) {
      result.measured.requests++;
      if (ok) {
        result.measured.latencyMs.push(latency);
        if (spec.kind === 'sse') result.measured.ttfbMs.push(ttfb);
        if (hit) result.measured.cacheHits++;
      }
    }
    if (!timeBased) {
      if (result.completed === warmupRequests) startMeasuring();
      if (result.completed === totalRequests) stopMeasuring();
    }
  };
  const recordError = (message: string): void => {
    if (result.errorSamples.length < 5) result.errorSamples.push(message);
  };
  const mayIssue = (): boolean => (timeBased ? !phase.stopped : issued < totalRequests);

  const clients = Array.from({ length: spec.connections }, () => new Client(url.origin, { pipelining: 1, keepAliveTimeout: 60_000 }));
  const loop = async (client: Client): Promise<void> => {
    while (mayIssue()) {
      const seq = issued++;
      const body = makeBody(seq);
      const t0 = performance.now();
      let ttfb = 0;
      try {
        const response = await client.request({ method: 'POST', path, headers, body, headersTimeout: spec.timeoutMs, bodyTimeout: spec.timeoutMs });
        let text = '';
        let first = true;
        for await (const chunk of response.body) {
          if (first) {
            ttfb = performance.now() - t0;
            first = false;
          }
          text += (chunk as Buffer).toString('utf8');
        }
        const latency = performance.now() - t0;
        const problem = checkResponse(spec.kind, response.statusCode, text);
        if (problem !== undefined) {
          recordError(problem);
          onOutcome(false, latency, ttfb, false);
          continue;
        }
        if (!sawSuccess) {
          sawSuccess = true;
          result.sampleHeaders = flatHeaders(response.headers);
        }
        onOutcome(true, latency, ttfb, response.headers['x-gateway-cache'] === 'hit');
      } catch (error) {
        recordError(`request failed: ${error instanceof Error ? error.message : String(error)}`);
        onOutcome(false, performance.now() - t0, ttfb, false);
        // A broken connection would spin; let the client reconnect on the next request.
        if (client.destroyed) return;
      }
    }
  };
  try {
    await Promise.all(clients.map(loop));
  } finally {
    for (const t of timers) clearTimeout(t);
    stopMeasuring();
    await Promise.all(clients.map((c) => c.close().catch(() => undefined)));
  }
  return result;
}

/** undefined when the response is a good completion, else a short description of what is wrong. */
export function checkResponse(kind: PayloadKind, status: number, text: string): string | undefined {
  if (status !== 200) return `HTTP ${status}: ${text.slice(0, 200)}`;
  if (kind === 'json') {
    return text.includes('"choices"') ? undefined : `200 without choices: ${text.slice(0, 200)}`;
  }
  if (!text.trimEnd().endsWith('data: [DONE]')) return `stream did not end with [DONE]: …${text.slice(-200)}`;
  if (text.includes('data: {"error"')) return `stream carried an error event: ${text.slice(0, 300)}`;
  return undefined;
}

function flatHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined) out[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  return out;
}
