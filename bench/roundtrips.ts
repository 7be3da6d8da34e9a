/**
 * Round trips per request, per peer (PostgreSQL, Redis, the upstream), counted from the kernel's
 * TCP statistics of the serving process: `ss -tinp` reports `data_segs_out` for each socket, and
 * a small request or a pipelined batch is one data segment on loopback. The target is "one round
 * trip per stage"; this shows each stage's trips the day it lands, without instrumenting the code.
 */
import { execFileSync } from 'node:child_process';

export interface SocketSends {
  localPort: number;
  peerPort: number;
  dataSegsOut: number;
}

/** Parses `ss -tinpH state established` output, keeping the sockets of `pid`. */
export function parseSs(output: string, pid: number): SocketSends[] {
  const lines = output.split('\n');
  const sockets: SocketSends[] = [];
  const owner = new RegExp(`pid=${pid}[,)]`);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (!owner.test(line)) continue;
    // Columns (state filtered, no header): Recv-Q Send-Q Local:Port Peer:Port users:(...)
    const columns = line.trim().split(/\s+/);
    const local = columns.find((c, index) => index >= 2 && /:\d+$/.test(c));
    const peer = local === undefined ? undefined : columns[columns.indexOf(local) + 1];
    const info = lines[i + 1] ?? '';
    const segs = /\bdata_segs_out:(\d+)/.exec(info);
    if (local === undefined || peer === undefined) continue;
    sockets.push({ localPort: portOf(local), peerPort: portOf(peer), dataSegsOut: segs ? Number(segs[1]) : 0 });
  }
  return sockets;
}

function portOf(address: string): number {
  return Number(address.slice(address.lastIndexOf(':') + 1));
}

export function snapshotSends(pid: number): SocketSends[] {
  return parseSs(execFileSync('ss', ['-tinpH', 'state', 'established'], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 }), pid);
}

/**
 * Data segments sent to each peer port between two snapshots. A socket opened in between counts
 * from zero; one closed in between is lost, and reported so the figure is known to be low.
 */
export function sendsBetween(before: readonly SocketSends[], after: readonly SocketSends[]): { byPeer: Map<number, number>; closedSockets: number } {
  const key = (s: SocketSends): string => `${s.localPort}-${s.peerPort}`;
  const start = new Map(before.map((s) => [key(s), s.dataSegsOut]));
  const byPeer = new Map<number, number>();
  for (const s of after) {
    const delta = s.dataSegsOut - (start.get(key(s)) ?? 0);
    byPeer.set(s.peerPort, (byPeer.get(s.peerPort) ?? 0) + delta);
  }
  const open = new Set(after.map(key));
  return { byPeer, closedSockets: before.filter((s) => !open.has(key(s))).length };
}
