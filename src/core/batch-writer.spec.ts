import { Writable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { BatchWriter, type BatchWriterOptions } from './batch-writer.js';
import { createLogger } from './logger.js';

const messages = { failed: 'flush failed', stillFailing: 'still failing', recovered: 'recovered' };

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function writer(store: (batch: readonly number[]) => Promise<number>, options: Partial<BatchWriterOptions<number>> = {}) {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(chunk.toString());
      done();
    },
  });
  const w = new BatchWriter<number>({
    store,
    batchSize: 3,
    flushMs: 100,
    maxBackoffMs: 1000,
    logger: createLogger('info', sink),
    messages,
    ...options,
  });
  return { w, logged: () => lines.map((l) => (JSON.parse(l) as { msg: string }).msg) };
}

describe('BatchWriter', () => {
  beforeEach(() => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval', 'setImmediate', 'Date'] });
    // No jitter: the next attempt comes after exactly half the backoff.
    vi.spyOn(Math, 'random').mockReturnValue(0);
  });
  afterEach(() => {
    vi.useRealTimers();
    vi.restoreAllMocks();
  });

  it('stores in batches of batchSize, in order, and flush() resolves once all are stored', async () => {
    const batches: number[][] = [];
    const { w } = writer((batch) => (batches.push([...batch]), Promise.resolve(batch.length)));
    for (let i = 0; i < 7; i++) w.add(i);
    expect(await w.flush()).toBe(true);
    expect(batches).toEqual([[0, 1, 2], [3, 4, 5], [6]]);
    expect(w.size).toBe(0);
  });

  it('starts a drain by itself once a batch is full, and on the timer otherwise', async () => {
    const stored: number[] = [];
    const { w } = writer((batch) => (stored.push(...batch), Promise.resolve(batch.length)));
    w.add(1);
    w.add(2);
    await vi.advanceTimersByTimeAsync(50);
    expect(stored).toEqual([]);
    w.add(3);
    await vi.advanceTimersByTimeAsync(0);
    expect(stored).toEqual([1, 2, 3]);

    w.start();
    w.add(4);
    await vi.advanceTimersByTimeAsync(100);
    expect(stored).toEqual([1, 2, 3, 4]);
    w.stop();
  });

  it('keeps failed items, retries after a growing delay, reports degraded and then recovers', async () => {
    const attempts: number[] = [];
    let failuresLeft = 4;
    const stored: number[] = [];
    const { w, logged } = writer((batch) => {
      attempts.push(Date.now());
      if (failuresLeft > 0) {
        failuresLeft -= 1;
        return Promise.reject(new Error('database away'));
      }
      stored.push(...batch);
      return Promise.resolve(batch.length);
    });
    w.start();
    w.add(1);
    await vi.advanceTimersByTimeAsync(1000);
    expect(w.report({ buffered: w.size })).toEqual({
      state: 'degraded',
      details: { buffered: 1, failing: true, consecutive_failures: 4, last_error: 'database away' },
    });
    await vi.advanceTimersByTimeAsync(2000);
    w.stop();

    expect(stored).toEqual([1]);
    expect(w.report({ buffered: w.size })).toEqual({ state: 'up', details: { buffered: 0 } });
    const gaps = attempts.slice(1).map((t, i) => t - (attempts[i] ?? 0));
    expect(gaps).toHaveLength(4);
    for (let i = 1; i < gaps.length; i++) expect(gaps[i]).toBeGreaterThan(gaps[i - 1] ?? Infinity);
    // The wait never exceeds maxBackoffMs (plus the timer's granularity).
    expect(Math.max(...gaps)).toBeLessThanOrEqual(1000 + 100);
    expect(logged()).toEqual(['flush failed', 'still failing', 'recovered']);
  });

  it('flush() resolves only when the batch is stored, and false when the database refused', async () => {
    const gate = deferred();
    let fail = false;
    const { w } = writer(async (batch) => {
      await gate.promise;
      if (fail) throw new Error('refused');
      return batch.length;
    });
    w.add(1);
    let settled: boolean | undefined;
    const flushed = w.flush().then((ok) => (settled = ok));
    await vi.advanceTimersByTimeAsync(500);
    expect(settled).toBeUndefined();
    gate.resolve();
    await flushed;
    expect(settled).toBe(true);

    fail = true;
    w.add(2);
    expect(await w.flush()).toBe(false);
    expect(w.size).toBe(1);
    expect(w.failures).toBe(1);
  });

  it('runs one drain at a time, however many flushes, timers and full batches ask for one', async () => {
    let inFlight = 0;
    let maxInFlight = 0;
    const gate = deferred();
    const { w } = writer(async (batch) => {
      inFlight += 1;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await gate.promise;
      inFlight -= 1;
      return batch.length;
    });
    w.start();
    for (let i = 0; i < 10; i++) w.add(i);
    const flushes = [w.flush(), w.flush(), w.flush()];
    await vi.advanceTimersByTimeAsync(500);
    expect(inFlight).toBe(1);
    gate.resolve();
    expect(await Promise.all(flushes)).toEqual([true, true, true]);
    w.stop();
    expect(maxInFlight).toBe(1);
    expect(w.size).toBe(0);
  });

  it('under steady traffic writes one batch per interval, not one tiny batch after another', async () => {
    const batches: number[][] = [];
    let next = 0;
    const { w } = writer(
      async (batch) => {
        batches.push([...batch]);
        // Each store takes 3 ms, and an item arrives every millisecond meanwhile.
        for (let i = 0; i < 3; i++) {
          await new Promise((resolve) => setTimeout(resolve, 1));
          w.add(next++);
        }
        return batch.length;
      },
      { batchSize: 1000, flushMs: 100 },
    );
    w.start();
    w.add(next++);
    await vi.advanceTimersByTimeAsync(1000);
    w.stop();
    // One store per 100 ms tick (the items of the interval together), not ~330 stores of 3.
    expect(batches.length).toBeLessThanOrEqual(10);
    expect(batches.slice(1).every((b) => b.length >= 3)).toBe(true);
  });

  it('a flush waits only for what was queued, not for what keeps arriving', async () => {
    const stored: number[] = [];
    let next = 100;
    const { w } = writer(
      (batch) => {
        stored.push(...batch);
        // Traffic keeps coming while each batch is written.
        w.add(next++);
        return Promise.resolve(batch.length);
      },
      { batchSize: 2 },
    );
    for (let i = 0; i < 4; i++) w.add(i);
    expect(await w.flush()).toBe(true);
    expect(stored.slice(0, 4)).toEqual([0, 1, 2, 3]);
    expect(w.size).toBeGreaterThan(0);
  });

  it('retries at once with what is left when store() takes nothing (the owner narrowing its batch down to a bad item)', async () => {
    const stored: number[] = [];
    const setAside: number[] = [];
    let limit = 6;
    const { w } = writer(
      (batch) => {
        const part = batch.slice(0, limit);
        if (part.includes(3) && part.length > 1) {
          limit = Math.ceil(part.length / 2);
          return Promise.resolve(0);
        }
        if (part.includes(3)) setAside.push(...part);
        else stored.push(...part);
        limit = 6;
        return Promise.resolve(part.length);
      },
      { batchSize: 6 },
    );
    for (let i = 0; i < 6; i++) w.add(i);
    expect(await w.flush()).toBe(true);
    expect(stored).toEqual([0, 1, 2, 4, 5]);
    expect(setAside).toEqual([3]);
    expect(w.size).toBe(0);
    expect(w.failures).toBe(0);
  });

  it('a shutdown drain also stores what requests still finishing add while it flushes', async () => {
    const stored: number[] = [];
    let next = 100;
    const { w } = writer((batch) => {
      stored.push(...batch);
      // Each INSERT sees another request finish meanwhile, for a while.
      if (next < 105) w.add(next++);
      return Promise.resolve(batch.length);
    });
    w.add(1);
    expect(await w.drainForShutdown()).toBe(true);
    expect(stored).toEqual([1, 100, 101, 102, 103, 104]);
    expect(w.size).toBe(0);
  });

  it('keeps a shutdown drain trying until its deadline while the database refuses, and stores once it is back', async () => {
    let down = true;
    const stored: number[] = [];
    const { w } = writer((batch) => {
      if (down) return Promise.reject(new Error('down'));
      stored.push(...batch);
      return Promise.resolve(batch.length);
    });
    w.add(1);
    const drained = w.drainForShutdown(Date.now() + 10_000);
    await vi.advanceTimersByTimeAsync(4000);
    down = false;
    await vi.advanceTimersByTimeAsync(1000);
    expect(await drained).toBe(true);
    expect(stored).toEqual([1]);
  });

  it('gives up a shutdown drain at its deadline when the database never answers, and stores nothing after it', async () => {
    let stores = 0;
    let timedOut: (error: Error) => void = () => undefined;
    // A database that holds the connection without answering: the store waits for the pool's
    // query timeout (35 s), far past the deadline.
    const { w } = writer(() => {
      stores += 1;
      return new Promise<number>((_, reject) => (timedOut = reject));
    });
    w.add(1);
    let result: boolean | undefined;
    void w.drainForShutdown(Date.now() + 1000).then((r) => (result = r));
    await vi.advanceTimersByTimeAsync(999);
    expect(result).toBeUndefined();
    await vi.advanceTimersByTimeAsync(1);
    expect(result).toBe(false);
    expect(w.size).toBe(1);
    expect(w.lastError).toMatch(/did not answer/);
    // The owner closes its pool next: once the abandoned statement fails, nothing more is sent to it.
    timedOut(new Error('Query read timeout'));
    w.add(2);
    await vi.advanceTimersByTimeAsync(5000);
    expect(await w.flush()).toBe(false);
    expect(stores).toBe(1);
  });

  it('gives up a shutdown drain after a few attempts and says so', async () => {
    const { w } = writer(() => Promise.reject(new Error('down')));
    w.add(1);
    const drained = w.drainForShutdown();
    await vi.advanceTimersByTimeAsync(1000);
    expect(await drained).toBe(false);
    expect(w.size).toBe(1);
  });
});
