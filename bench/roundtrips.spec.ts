import { describe, expect, it } from 'vitest';
import { parseSs, sendsBetween } from './roundtrips.js';

// `ss -tinpH state established`: one socket line, then its TCP info line.
const SS = [
  '0      0          127.0.0.1:41000     127.0.0.1:5432  users:(("node",pid=4242,fd=21))',
  '\t cubic wscale:7,7 rto:204 rtt:0.05/0.02 bytes_sent:900 segs_out:40 segs_in:38 data_segs_out:30 data_segs_in:29 lastsnd:10',
  '0      0          127.0.0.1:41002     127.0.0.1:6379  users:(("node",pid=4242,fd=22))',
  '\t cubic wscale:7,7 data_segs_out:7 data_segs_in:7',
  '0      0          127.0.0.1:41004     127.0.0.1:5432  users:(("node",pid=42420,fd=9))',
  '\t cubic data_segs_out:999',
  '0      0          127.0.0.1:8080      127.0.0.1:55555 users:(("node",pid=4242,fd=30),("node",pid=1,fd=3))',
  '\t cubic segs_out:3',
].join('\n');

describe('parseSs', () => {
  it('keeps the sockets of one pid (not a pid that merely starts with it) with their data segments', () => {
    expect(parseSs(SS, 4242)).toEqual([
      { localPort: 41000, peerPort: 5432, dataSegsOut: 30 },
      { localPort: 41002, peerPort: 6379, dataSegsOut: 7 },
      { localPort: 8080, peerPort: 55555, dataSegsOut: 0 },
    ]);
  });
});

describe('sendsBetween', () => {
  it('sums per peer port, counts new sockets from zero and reports closed ones', () => {
    const before = [
      { localPort: 1, peerPort: 5432, dataSegsOut: 10 },
      { localPort: 2, peerPort: 5432, dataSegsOut: 5 },
      { localPort: 3, peerPort: 6379, dataSegsOut: 100 },
    ];
    const after = [
      { localPort: 1, peerPort: 5432, dataSegsOut: 14 },
      { localPort: 4, peerPort: 5432, dataSegsOut: 2 },
      { localPort: 3, peerPort: 6379, dataSegsOut: 103 },
    ];
    const { byPeer, closedSockets } = sendsBetween(before, after);
    expect(byPeer.get(5432)).toBe(6);
    expect(byPeer.get(6379)).toBe(3);
    expect(closedSockets).toBe(1);
  });
});
