import { afterEach, describe, expect, it } from 'vitest';
import { GatewayError } from '../../core/errors.js';
import { type JobHandler, JobQueue, type JobQueueOptions, RecheckJobError, RetryJobError } from '../job-queue.js';

export interface OpenedQueue {
  queue: JobQueue;
  /** Closes the queue and removes whatever it left behind (Redis keys). */
  cleanup(): Promise<void>;
}

/** Builds a queue that is ready to use (connected), not yet started. */
export type QueueFactory = (options: JobQueueOptions) => Promise<OpenedQueue>;

interface Deferred {
  promise: Promise<void>;
  resolve(): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

async function eventually(check: () => void | Promise<void>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await check();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}

/** A handler that records what the queue does with it; `behaviour` decides each try. */
class RecordingHandler implements JobHandler {
  readonly runs: string[] = [];
  readonly abandoned: Array<{ jobId: string; error: unknown }> = [];
  readonly signals = new Map<string, AbortSignal>();
  active = 0;
  maxActive = 0;

  constructor(private readonly behaviour: (jobId: string, tryNo: number, signal: AbortSignal) => Promise<void> = () => Promise.resolve()) {}

  triesOf(jobId: string): number {
    return this.runs.filter((id) => id === jobId).length;
  }

  async run(jobId: string, signal: AbortSignal): Promise<void> {
    this.runs.push(jobId);
    this.signals.set(jobId, signal);
    this.active += 1;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      await this.behaviour(jobId, this.triesOf(jobId), signal);
    } finally {
      this.active -= 1;
    }
  }

  abandon(jobId: string, error: unknown): Promise<void> {
    this.abandoned.push({ jobId, error });
    return Promise.resolve();
  }
}

let counter = 0;
const newId = () => `00000000-0000-4000-8000-${String(++counter).padStart(12, '0')}`;

/**
 * The behaviour every JobQueue driver must have, run against the inline queue and against
 * BullMQ on the real Redis (ARCHITECTURE.md: one contract suite per port).
 */
export function jobQueueContract(name: string, factory: QueueFactory): void {
  describe(`JobQueue contract: ${name}`, () => {
    const opened: OpenedQueue[] = [];
    const openWithCleanup = async (overrides: Partial<JobQueueOptions> = {}): Promise<OpenedQueue> => {
      const q = await factory({ concurrency: 2, maxQueued: 100, maxTries: 4, backoff: () => 5, shutdownGraceMs: 500, ...overrides });
      opened.push(q);
      return q;
    };
    const open = async (overrides: Partial<JobQueueOptions> = {}): Promise<JobQueue> => (await openWithCleanup(overrides)).queue;
    afterEach(async () => {
      for (const q of opened.splice(0)) await q.cleanup();
    });

    it('runs every submitted job once, then holds nothing', async () => {
      const queue = await open();
      const handler = new RecordingHandler();
      queue.start(handler);
      const ids = [newId(), newId(), newId()];
      for (const id of ids) await queue.submit(id);
      await eventually(() => expect([...handler.runs].sort()).toEqual([...ids].sort()));
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
      expect(handler.abandoned).toEqual([]);
    });

    it('retries after a RetryJobError until the handler returns', async () => {
      const queue = await open();
      const handler = new RecordingHandler((_id, tryNo) => (tryNo < 3 ? Promise.reject(new RetryJobError(5, 'upstream 503')) : Promise.resolve()));
      queue.start(handler);
      const id = newId();
      await queue.submit(id);
      await eventually(() => expect(handler.triesOf(id)).toBe(3));
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
      expect(handler.abandoned).toEqual([]);
    });

    it('waits out the delay a RetryJobError asks for (the job is delayed meanwhile)', async () => {
      const queue = await open();
      const handler = new RecordingHandler((_id, tryNo) => (tryNo === 1 ? Promise.reject(new RetryJobError(60_000, 'later')) : Promise.resolve()));
      queue.start(handler);
      const id = newId();
      await queue.submit(id);
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 1 }));
      expect(handler.triesOf(id)).toBe(1);
    });

    it('retries other errors with its own backoff and, after its cap on tries, hands the job to abandon()', async () => {
      const queue = await open({ maxTries: 3 });
      const handler = new RecordingHandler(() => Promise.reject(new Error('database away')));
      queue.start(handler);
      const id = newId();
      await queue.submit(id);
      await eventually(() => expect(handler.abandoned.map((a) => a.jobId)).toEqual([id]));
      expect(handler.triesOf(id)).toBe(3);
      expect((handler.abandoned[0]?.error as Error).message).toBe('database away');
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
    });

    it('asks again after a RecheckJobError however often, without counting it towards its cap (no abandon())', async () => {
      const queue = await open({ maxTries: 2 });
      // A run elsewhere outlasting the cap several times over: each delivery only finds it still running.
      const handler = new RecordingHandler((_id, tryNo) => (tryNo <= 5 ? Promise.reject(new RecheckJobError(5, 'running elsewhere')) : Promise.resolve()));
      queue.start(handler);
      const id = newId();
      await queue.submit(id);
      await eventually(() => expect(handler.triesOf(id)).toBe(6));
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
      expect(handler.abandoned).toEqual([]);
    });

    it('never runs more jobs at once than its concurrency', async () => {
      const queue = await open({ concurrency: 2 });
      const gate = deferred();
      const handler = new RecordingHandler(() => gate.promise);
      queue.start(handler);
      const ids = Array.from({ length: 5 }, newId);
      for (const id of ids) await queue.submit(id);
      await eventually(() => expect(handler.active).toBe(2));
      expect(await queue.counts()).toMatchObject({ active: 2, waiting: 3 });
      gate.resolve();
      await eventually(() => expect(handler.runs).toHaveLength(5));
      expect(handler.maxActive).toBe(2);
    });

    it('refuses submits beyond its bound with 503 queue_full and retry-after; requeue of an accepted job is never refused', async () => {
      const queue = await open({ concurrency: 1, maxQueued: 3 });
      const gate = deferred();
      const handler = new RecordingHandler(() => gate.promise);
      queue.start(handler);
      const ids = [newId(), newId(), newId()];
      for (const id of ids) await queue.submit(id);
      await eventually(() => expect(handler.active).toBe(1));
      // Running jobs count against the bound as well as waiting ones.
      const refused = await queue.submit(newId()).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(GatewayError);
      expect(refused).toMatchObject({ code: 'queue_full', status: 503 });
      expect((refused as GatewayError).headers?.['retry-after']).toMatch(/^\d+$/);
      const recovered = newId();
      await queue.requeue(recovered);
      gate.resolve();
      await eventually(() => expect(handler.runs).toHaveLength(4));
      expect(handler.runs).toContain(recovered);
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
      await queue.submit(newId());
    });

    it('accepts exactly its bound of 20 submits made at once and refuses the rest with 503 queue_full', async () => {
      // Not started: nothing drains, so every accepted submit is still held.
      const queue = await open({ concurrency: 1, maxQueued: 3 });
      const outcomes = await Promise.allSettled(Array.from({ length: 20 }, () => queue.submit(newId())));
      expect(outcomes.filter((o) => o.status === 'fulfilled')).toHaveLength(3);
      for (const o of outcomes) if (o.status === 'rejected') expect(o.reason).toMatchObject({ code: 'queue_full', status: 503 });
      expect(await queue.counts()).toEqual({ waiting: 3, active: 0, delayed: 0 });
    });

    it('treats a requeue of a job it still holds as a no-op', async () => {
      const queue = await open({ concurrency: 1 });
      const gate = deferred();
      const handler = new RecordingHandler((id) => (id === blocker ? gate.promise : Promise.resolve()));
      const blocker = newId();
      const waiting = newId();
      queue.start(handler);
      await queue.submit(blocker);
      await queue.submit(waiting);
      await eventually(() => expect(handler.active).toBe(1));
      await queue.requeue(waiting);
      await queue.requeue(blocker);
      gate.resolve();
      await eventually(() => expect(handler.triesOf(waiting)).toBe(1));
      await eventually(async () => expect(await queue.counts()).toEqual({ waiting: 0, active: 0, delayed: 0 }));
      expect(handler.triesOf(blocker)).toBe(1);
      expect(handler.triesOf(waiting)).toBe(1);
    });

    it('keeps jobs submitted before start() and runs them once it starts', async () => {
      const queue = await open();
      const ids = [newId(), newId()];
      for (const id of ids) await queue.submit(id);
      expect(await queue.counts()).toMatchObject({ waiting: 2, active: 0 });
      const handler = new RecordingHandler();
      queue.start(handler);
      await eventually(() => expect([...handler.runs].sort()).toEqual([...ids].sort()));
    });

    it('stop() lets a running job finish', async () => {
      const queue = await open({ shutdownGraceMs: 5_000 });
      const gate = deferred();
      let finished = false;
      const handler = new RecordingHandler(async () => {
        await gate.promise;
        finished = true;
      });
      queue.start(handler);
      await queue.submit(newId());
      await eventually(() => expect(handler.active).toBe(1));
      const stopping = queue.stop();
      setTimeout(() => gate.resolve(), 50);
      await stopping;
      expect(finished).toBe(true);
    });

    it('stop() aborts a job still running after the grace period', async () => {
      const queue = await open({ shutdownGraceMs: 100 });
      const id = newId();
      const handler = new RecordingHandler(
        (_id, _tryNo, signal) =>
          new Promise<void>((_, reject) => {
            signal.addEventListener('abort', () => reject(new RetryJobError(0, 'interrupted')), { once: true });
          }),
      );
      queue.start(handler);
      await queue.submit(id);
      await eventually(() => expect(handler.active).toBe(1));
      await queue.stop();
      expect(handler.signals.get(id)?.aborted).toBe(true);
      expect(handler.active).toBe(0);
    });

    // At shutdown close() follows stop() (JobsRuntime), and the app's own shutdown follows that: for
    // BullMQ cleanup() closes the Nest context too, whose @nestjs/bullmq hook closes the worker again.
    it('close() after stop() is prompt while a job ignores the abort, and leaves that job to recovery: neither finished nor given up on', async () => {
      const q = await openWithCleanup({ concurrency: 1, maxTries: 1, shutdownGraceMs: 1_500 });
      const { queue } = q;
      const id = newId();
      const gate = deferred();
      // Does not listen to its signal; fails once the shutdown is over. With one try allowed, a
      // failure counted against the job would hand it to abandon() (dead-lettered).
      const handler = new RecordingHandler(async () => {
        await gate.promise;
        throw new Error('ended after the shutdown');
      });
      queue.start(handler);
      await queue.submit(id);
      await eventually(() => expect(handler.active).toBe(1));
      await queue.stop();
      expect(handler.signals.get(id)?.aborted).toBe(true);
      // Still held: the next start (inline) or another worker (BullMQ, once its lock expires) runs it.
      expect(await queue.counts()).toEqual({ waiting: 0, active: 1, delayed: 0 });
      // Closed here rather than by afterEach; the first stop() waited out the grace period already.
      opened.splice(opened.indexOf(q), 1);
      const graceAgain = new Promise<string>((resolve) => setTimeout(() => resolve('still closing after 1 s'), 1_000).unref());
      expect(await Promise.race([q.cleanup().then(() => 'closed'), graceAgain])).toBe('closed');
      gate.resolve();
      await new Promise((r) => setTimeout(r, 50));
      expect(handler.abandoned).toEqual([]);
      expect(handler.triesOf(id)).toBe(1);
    });

    it('reports itself up, with its counts, to readiness', async () => {
      const queue = await open();
      const report = await queue.health();
      expect(report.state).toBe('up');
      expect(report.details).toMatchObject({ driver: queue.driver, waiting: 0, active: 0, delayed: 0 });
    });
  });
}
