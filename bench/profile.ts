/**
 * Reads a V8 .cpuprofile (what `node --cpu-prof` and the inspector's Profiler.stop produce) and
 * answers "what dominates": self time per function and per area (package, Node core module,
 * gateway feature folder), as a share of the busy (non-idle) samples.
 */

export interface CpuProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  children?: number[];
}

export interface CpuProfile {
  nodes: CpuProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface FrameShare {
  frame: string;
  area: string;
  selfMs: number;
  /** Percent of busy samples. */
  selfPct: number;
}

export interface ProfileSummary {
  durationMs: number;
  /** The sampling interval (median of timeDeltas); every sample counts for this long. */
  intervalUs: number;
  busyMs: number;
  idlePct: number;
  top: FrameShare[];
  areas: Array<{ area: string; selfMs: number; selfPct: number }>;
  /**
   * Busy time charged to the innermost frame on the stack that is a package or gateway code,
   * so a syscall (`writev`) or a Node core stream counts for whoever asked for it (pg, ioredis,
   * fastify, …). Time with no such frame keeps its own area (GC, node core on its own).
   */
  attributed: Array<{ area: string; ms: number; pct: number }>;
}

function medianOf(values: readonly number[]): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[sorted.length >> 1] ?? 0;
}

/** Areas that are Node itself or V8, as opposed to a package or the gateway's own code. */
function isRuntimeArea(area: string): boolean {
  return area.startsWith('node:') || area === 'native' || area === 'native (program)' || area === 'GC' || area === 'other';
}

const IDLE = new Set(['(idle)', '(root)']);

/** Where a frame's code lives, coarse enough to read as "who costs what". */
export function areaOf(functionName: string, url: string): string {
  if (url === '') {
    if (functionName === '(garbage collector)') return 'GC';
    if (functionName === '(program)') return 'native (program)';
    if (IDLE.has(functionName)) return 'idle';
    return 'native';
  }
  const nm = url.lastIndexOf('/node_modules/');
  if (nm !== -1) {
    const rest = url.slice(nm + '/node_modules/'.length).split('/');
    return rest[0]?.startsWith('@') ? `${rest[0]}/${rest[1] ?? ''}` : (rest[0] ?? 'node_modules');
  }
  // Profiler.stop runs on the main thread; its time lands on the last sample. Not the gateway's cost.
  if (url.startsWith('node:inspector')) return 'profiler';
  if (url.startsWith('node:')) {
    const parts = url.slice('node:'.length).split('/');
    const name = parts[0] === 'internal' ? (parts[1] ?? 'internal') : (parts[0] ?? '');
    return `node:${name.replace(/\.js$/, '').replace(/^_/, '')}`;
  }
  for (const [marker, label] of [
    ['/dist/src/', 'gatehouse'],
    ['/dist/libs/', 'libs'],
    ['/dist/bench/', 'bench'],
  ] as const) {
    const at = url.indexOf(marker);
    if (at !== -1) {
      const folder = url.slice(at + marker.length).split('/')[0] ?? '';
      return `${label}/${folder.replace(/\.js$/, '')}`;
    }
  }
  return 'other';
}

function shortUrl(url: string): string {
  const nm = url.lastIndexOf('/node_modules/');
  if (nm !== -1) return url.slice(nm + '/node_modules/'.length);
  const dist = url.indexOf('/dist/');
  if (dist !== -1) return url.slice(dist + '/dist/'.length);
  return url.replace(/^file:\/\//, '');
}

export function summarizeProfile(profile: CpuProfile, topN = 25): ProfileSummary {
  const byId = new Map<number, CpuProfileNode>();
  for (const node of profile.nodes) byId.set(node.id, node);
  // Samples are counted, each worth the nominal interval, rather than weighted by timeDeltas: on
  // a busy machine the process is often descheduled, and the sample after such a gap carries
  // the whole gap (here the top 1% of samples held a quarter to a third of all time), charging
  // wall time to whatever frame happened to be preempted.
  const nominalUs = medianOf(profile.timeDeltas);
  const selfUs = new Map<number, number>();
  for (const id of profile.samples) selfUs.set(id, (selfUs.get(id) ?? 0) + nominalUs);
  const parent = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);
  const attributedTo = new Map<number, string>();
  const attribution = (id: number): string => {
    const known = attributedTo.get(id);
    if (known !== undefined) return known;
    let cursor: number | undefined = id;
    let found: string | undefined;
    while (cursor !== undefined) {
      const n = byId.get(cursor);
      if (!n) break;
      const area = areaOf(n.callFrame.functionName, n.callFrame.url);
      if (!isRuntimeArea(area) && area !== 'idle' && area !== 'profiler') {
        found = area;
        break;
      }
      cursor = parent.get(cursor);
    }
    const leaf = byId.get(id);
    const result = found ?? (leaf ? areaOf(leaf.callFrame.functionName, leaf.callFrame.url) : 'other');
    attributedTo.set(id, result);
    return result;
  };
  const attributed = new Map<string, number>();
  const frames = new Map<string, { area: string; us: number }>();
  const areas = new Map<string, number>();
  let busyUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfUs) {
    const node = byId.get(id);
    if (!node) continue;
    const { functionName, url, lineNumber } = node.callFrame;
    const area = areaOf(functionName, url);
    if (area === 'profiler') continue;
    if (area === 'idle') {
      idleUs += us;
      continue;
    }
    busyUs += us;
    const frame = url === '' ? functionName : `${functionName || '(anonymous)'} ${shortUrl(url)}:${lineNumber + 1}`;
    const entry = frames.get(frame) ?? { area, us: 0 };
    entry.us += us;
    frames.set(frame, entry);
    areas.set(area, (areas.get(area) ?? 0) + us);
    const owner = attribution(id);
    attributed.set(owner, (attributed.get(owner) ?? 0) + us);
  }
  const pct = (us: number): number => (busyUs > 0 ? (100 * us) / busyUs : 0);
  return {
    durationMs: (profile.endTime - profile.startTime) / 1000,
    intervalUs: nominalUs,
    busyMs: busyUs / 1000,
    idlePct: busyUs + idleUs > 0 ? (100 * idleUs) / (busyUs + idleUs) : 0,
    top: [...frames.entries()]
      .sort((a, b) => b[1].us - a[1].us)
      .slice(0, topN)
      .map(([frame, { area, us }]) => ({ frame, area, selfMs: us / 1000, selfPct: pct(us) })),
    areas: [...areas.entries()].sort((a, b) => b[1] - a[1]).map(([area, us]) => ({ area, selfMs: us / 1000, selfPct: pct(us) })),
    attributed: [...attributed.entries()].sort((a, b) => b[1] - a[1]).map(([area, us]) => ({ area, ms: us / 1000, pct: pct(us) })),
  };
}

export function profileMarkdown(title: string, summary: ProfileSummary, topAreas = 15): string {
  const lines = [
    `#### ${title}`,
    '',
    `Profiled ${summary.durationMs.toFixed(0)} ms wall, ${summary.busyMs.toFixed(0)} ms busy by sample count at ${summary.intervalUs.toFixed(0)} µs (idle ${summary.idlePct.toFixed(0)}%). Shares are of busy samples.`,
    '',
    '| area | self % | | charged to the innermost package / gateway frame | % |',
    '|---|---:|---|---|---:|',
    ...Array.from({ length: Math.min(topAreas, Math.max(summary.areas.length, summary.attributed.length)) }, (_, i) => {
      const a = summary.areas[i];
      const b = summary.attributed[i];
      return `| ${a?.area ?? ''} | ${a ? a.selfPct.toFixed(1) : ''} | | ${b?.area ?? ''} | ${b ? b.pct.toFixed(1) : ''} |`;
    }),
    '',
    '| top self-time frames | area | self % |',
    '|---|---|---:|',
    ...summary.top.map((f) => `| \`${f.frame.replace(/\|/g, '\\|')}\` | ${f.area} | ${f.selfPct.toFixed(1)} |`),
    '',
  ];
  return lines.join('\n');
}
