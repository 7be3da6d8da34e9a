import { describe, expect, it } from 'vitest';
import { areaOf, type CpuProfile, summarizeProfile } from './profile.js';

describe('areaOf', () => {
  it.each([
    ['parse', 'file:///w/node_modules/fastify/lib/route.js', 'fastify'],
    ['x', 'file:///w/node_modules/@nestjs/core/router/router-proxy.js', '@nestjs/core'],
    ['write', 'node:internal/streams/writable', 'node:streams'],
    ['onread', 'node:_http_server', 'node:http_server'],
    ['complete', 'file:///w/dist/src/completion/completion.service.js', 'gatehouse/completion'],
    ['main', 'file:///w/dist/src/main.js', 'gatehouse/main'],
    ['(garbage collector)', '', 'GC'],
    ['(idle)', '', 'idle'],
    ['post', 'node:inspector', 'profiler'],
  ])('%s in %s → %s', (fn, url, area) => {
    expect(areaOf(fn, url)).toBe(area);
  });
});

describe('summarizeProfile', () => {
  const node = (id: number, functionName: string, url: string, children: number[] = []) => ({
    id,
    callFrame: { functionName, url, lineNumber: 9, columnNumber: 0 },
    children,
  });
  const profile: CpuProfile = {
    nodes: [
      node(1, '(root)', '', [2, 3, 4]),
      node(2, '(idle)', ''),
      node(3, 'handle', 'file:///w/node_modules/fastify/lib/route.js', [5]),
      node(4, '(garbage collector)', ''),
      node(5, 'stringify', 'file:///w/dist/src/core/errors.js'),
    ],
    // 4 samples idle, 3 in handle, 2 in stringify, 1 in GC; 100 µs each.
    samples: [2, 2, 2, 2, 3, 3, 3, 5, 5, 4],
    timeDeltas: [100, 100, 100, 100, 100, 100, 100, 100, 100, 100],
    startTime: 0,
    endTime: 1000,
  };

  it('charges native and Node-core time to the innermost package or gateway frame above it', () => {
    const withSyscall: CpuProfile = {
      nodes: [
        node(1, '(root)', '', [2]),
        node(2, 'query', 'file:///w/node_modules/pg/lib/client.js', [3]),
        node(3, 'write', 'node:internal/streams/writable', [4]),
        node(4, 'writev', ''),
      ],
      samples: [4, 4, 3, 2],
      timeDeltas: [100, 100, 100, 100],
      startTime: 0,
      endTime: 400,
    };
    const s = summarizeProfile(withSyscall);
    expect(s.attributed).toEqual([{ area: 'pg', ms: 0.4, pct: 100 }]);
    expect(s.areas.map((a) => a.area)).toEqual(['native', 'node:streams', 'pg']);
  });

  it('charges self time per frame as a share of busy (non-idle) time', () => {
    const s = summarizeProfile(profile);
    expect(s.busyMs).toBeCloseTo(0.6);
    expect(s.idlePct).toBeCloseTo(40);
    expect(s.top[0]).toMatchObject({ frame: 'handle fastify/lib/route.js:10', area: 'fastify', selfPct: 50 });
    expect(s.top.map((f) => f.frame)).toContain('(garbage collector)');
    expect(s.areas).toEqual([
      { area: 'fastify', selfMs: 0.3, selfPct: 50 },
      { area: 'gatehouse/core', selfMs: 0.2, selfPct: expect.closeTo(33.33, 1) as number },
      { area: 'GC', selfMs: 0.1, selfPct: expect.closeTo(16.67, 1) as number },
    ]);
  });
});
