/**
 * CPU and memory of another process, read from Linux /proc. The benchmark measures the process
 * that serves (the gateway's own node process, never npm or a shell in between), and it does
 * so from the load generator, so the reading brackets exactly the measured window.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

/** utime + stime of a whole process (all threads: JS, GC helpers, libuv pool), in clock ticks. */
export interface CpuTicks {
  utime: number;
  stime: number;
}

/**
 * Parses one `/proc/<pid>/stat` line. The second field (the command name) is in parentheses and
 * may itself contain spaces and parentheses, so fields are counted from the LAST ')'.
 * utime and stime are fields 14 and 15 (1-based, see proc(5)).
 */
export function parseProcStat(line: string): CpuTicks {
  const close = line.lastIndexOf(')');
  if (close === -1) throw new Error(`not a /proc/<pid>/stat line: ${line.slice(0, 80)}`);
  // After ")" comes field 3 (state); utime is field 14 → index 11 here, stime index 12.
  const rest = line
    .slice(close + 2)
    .trim()
    .split(/\s+/);
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  if (!Number.isInteger(utime) || !Number.isInteger(stime) || utime < 0 || stime < 0) {
    throw new Error(`cannot read utime/stime from /proc stat line: ${line.slice(0, 80)}`);
  }
  return { utime, stime };
}

/** CPU seconds spent between two readings of the same process. */
export function cpuSecondsBetween(before: CpuTicks, after: CpuTicks, ticksPerSecond: number): number {
  return ticksBetween(before.utime + before.stime, after.utime + after.stime) / ticksPerSecond;
}

/**
 * Seconds of that CPU spent in the kernel (system calls, and the loopback TCP work they do for the
 * peer). A CPU profile cannot tell this: its samples are taken on a wall-clock timer, so a frame
 * that makes a system call is also charged with the time the thread sat descheduled in it.
 */
export function systemSecondsBetween(before: CpuTicks, after: CpuTicks, ticksPerSecond: number): number {
  return ticksBetween(before.stime, after.stime) / ticksPerSecond;
}

function ticksBetween(before: number, after: number): number {
  if (after < before) throw new Error('CPU ticks went backwards: the two readings are not of the same process');
  return after - before;
}

/** A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, …), in kilobytes; undefined when absent. */
export function parseStatusKb(status: string, field: string): number | undefined {
  const match = new RegExp(`^${field}:\\s+(\\d+)\\s+kB`, 'm').exec(status);
  return match ? Number(match[1]) : undefined;
}

export function readCpuTicks(pid: number): CpuTicks {
  return parseProcStat(readFileSync(`/proc/${pid}/stat`, 'utf8'));
}

export interface MemoryReading {
  rssKb: number;
  /** Peak RSS over the process lifetime. */
  hwmKb: number;
}

export function readMemory(pid: number): MemoryReading {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return { rssKb: parseStatusKb(status, 'VmRSS') ?? 0, hwmKb: parseStatusKb(status, 'VmHWM') ?? 0 };
}

let ticksPerSecond: number | undefined;

/** sysconf(_SC_CLK_TCK): Node does not expose it, `getconf` does; 100 on every common Linux. */
export function clockTicksPerSecond(): number {
  if (ticksPerSecond === undefined) {
    try {
      const n = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
      ticksPerSecond = Number.isInteger(n) && n > 0 ? n : 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}
