import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ManualClock } from '../core/clock.js';
import { createLogger } from '../core/logger.js';
import type { RedisCommands } from '../redis/resp-client.js';
import { MemoryRateLimitStore } from './memory-rate-limit.store.js';
import { RedisRateLimitStore } from './redis-rate-limit.store.js';

/** A connection that is up and refuses every command while `refusing` (a demoted primary). */
class FakeClient implements RedisCommands {
  status = 'ready';
  refusing = true;
  readonly sent: string[] = [];
  call(command: string, ...args: Array<string | number>): Promise<unknown> {
    this.sent.push(`${command} ${String(args[0])}`);
    if (this.status !== 'ready') return Promise.reject(new Error(`Redis connection is ${this.status}`));
    if (this.refusing) return Promise.reject(new Error("READONLY You can't write against a read only replica."));
    return Promise.resolve(command === 'SET' ? 'OK' : [1, 1, 60_000, 0, 0]);
  }
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

function setup() {
  const messages: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      messages.push((JSON.parse(chunk.toString()) as { msg: string }).msg);
      done();
    },
  });
  const client = new FakeClient();
  const store = new RedisRateLimitStore(client, 'p:', new MemoryRateLimitStore(new ManualClock(0)), createLogger('info', sink));
  return { client, store, messages };
}

const bucket = { key: 'k:1', limit: 5, windowMs: 60_000, cost: 1 };

describe('RedisRateLimitStore readiness', () => {
  // Before, describe() said up whenever the connection was: every probe logged a recovery, and
  // the next request the outage again.
  it('stays degraded while a connected Redis refuses commands, logging it once, and is up once its probe write succeeds', async () => {
    const { client, store, messages } = setup();
    expect(store.describe().state).toBe('up');
    expect(client.sent).toEqual([]); // nothing probed while up

    for (let i = 0; i < 3; i++) {
      expect((await store.hit([bucket])).allowed).toBe(true); // answered by the memory store
      expect(store.describe()).toMatchObject({ state: 'degraded', details: { mode: 'per-instance memory counters', reason: expect.stringMatching(/^READONLY/) } });
      await settle();
    }
    expect(client.sent.filter((c) => c === 'SET p:rl:probe')).toHaveLength(3);
    expect(messages).toEqual(['Redis unavailable: rate limits fall back to per-instance memory counters']);

    client.refusing = false;
    expect(store.describe().state).toBe('degraded'); // the probe's answer shows on the next check
    await settle();
    expect(store.describe().state).toBe('up');
    expect(messages).toEqual(['Redis unavailable: rate limits fall back to per-instance memory counters', 'Redis back: rate limits shared across instances again']);
  });

  it('says degraded while disconnected, and up at once when connected again if no request failed meanwhile', () => {
    const { client, store, messages } = setup();
    client.status = 'reconnecting';
    expect(store.describe().state).toBe('degraded');
    client.status = 'ready';
    client.refusing = false;
    expect(store.describe().state).toBe('up');
    expect(client.sent).toEqual([]);
    expect(messages).toEqual([]);
  });
});
