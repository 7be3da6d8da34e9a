import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../core/logger.js';
import { FallbackState } from '../redis/fallback-state.js';
import { formatReset } from './rate-limiter.service.js';

describe('formatReset (OpenAI header format)', () => {
  it.each([
    [0, '0ms'],
    [250.2, '251ms'],
    [1000, '1s'],
    [17_001, '18s'],
    [59_999, '1m0s'],
    [60_000, '1m0s'],
    [61_000, '1m1s'],
  ])('%d ms → %s', (ms, text) => {
    expect(formatReset(ms)).toBe(text);
  });
});

describe('FallbackState', () => {
  it('logs an outage and a recovery once each, however many requests see them', () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const state = new FallbackState(createLogger('info', sink), { degraded: 'went away', recovered: 'came back' });
    state.ok();
    for (let i = 0; i < 100; i++) state.fail('ECONNREFUSED');
    expect(state.degraded).toBe(true);
    expect(state.describe()).toMatchObject({ reason: 'ECONNREFUSED' });
    for (let i = 0; i < 100; i++) state.ok();
    expect(state.degraded).toBe(false);
    expect(lines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['went away', 'came back']);
  });
});
