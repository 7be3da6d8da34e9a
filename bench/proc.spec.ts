import { describe, expect, it } from 'vitest';
import { clockTicksPerSecond, cpuSecondsBetween, parseProcStat, parseStatusKb, readCpuTicks, readMemory, systemSecondsBetween } from './proc.js';

// A real /proc/<pid>/stat line of a node process (utime 1234, stime 56).
const NODE_STAT =
  '20139 (node) S 20126 20126 12287 0 -1 4194560 31345 0 12 0 1234 56 0 0 20 0 11 0 93021 1202647040 45611 18446744073709551615 1 1 0 0 0 0 0 16781312 134235650 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0';

describe('parseProcStat', () => {
  it('reads utime and stime (fields 14 and 15)', () => {
    expect(parseProcStat(NODE_STAT)).toEqual({ utime: 1234, stime: 56 });
  });

  it('counts fields from the last parenthesis, so a command name with spaces and parentheses cannot shift them', () => {
    const tricky = NODE_STAT.replace('(node)', '(node (worker) 1 2 3)');
    expect(parseProcStat(tricky)).toEqual({ utime: 1234, stime: 56 });
  });

  it('refuses lines that are not a stat line', () => {
    expect(() => parseProcStat('hello world')).toThrow(/not a \/proc/);
    expect(() => parseProcStat('1 (x) S 1 2')).toThrow(/utime\/stime/);
  });
});

describe('cpuSecondsBetween', () => {
  it('adds user and system ticks and converts with the clock tick rate', () => {
    expect(cpuSecondsBetween({ utime: 100, stime: 10 }, { utime: 250, stime: 40 }, 100)).toBe(1.8);
  });

  it('refuses readings that go backwards (another process, or a restart)', () => {
    expect(() => cpuSecondsBetween({ utime: 100, stime: 10 }, { utime: 50, stime: 10 }, 100)).toThrow(/backwards/);
  });
});

describe('systemSecondsBetween', () => {
  it('counts only the system ticks', () => {
    expect(systemSecondsBetween({ utime: 100, stime: 10 }, { utime: 250, stime: 40 }, 100)).toBe(0.3);
  });

  it('refuses readings that go backwards', () => {
    expect(() => systemSecondsBetween({ utime: 100, stime: 10 }, { utime: 150, stime: 5 }, 100)).toThrow(/backwards/);
  });
});

describe('parseStatusKb', () => {
  const status = 'Name:\tnode\nVmPeak:\t 1300000 kB\nVmHWM:\t  254000 kB\nVmRSS:\t  201234 kB\nThreads:\t11\n';

  it('reads kB fields by name', () => {
    expect(parseStatusKb(status, 'VmRSS')).toBe(201234);
    expect(parseStatusKb(status, 'VmHWM')).toBe(254000);
  });

  it('is undefined for a missing field', () => {
    expect(parseStatusKb(status, 'VmSwap')).toBeUndefined();
  });
});

describe('reading a live process', () => {
  it('reads this process: whole ticks, a positive RSS, and a peak at least as large', () => {
    const ticks = readCpuTicks(process.pid);
    expect(Number.isInteger(ticks.utime + ticks.stime)).toBe(true);
    const memory = readMemory(process.pid);
    expect(memory.rssKb).toBeGreaterThan(0);
    expect(memory.hwmKb).toBeGreaterThanOrEqual(memory.rssKb);
    expect(clockTicksPerSecond()).toBeGreaterThan(0);
  });
});
