import { type INestApplicationContext, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { describe, expect, it } from 'vitest';
import { CoreModule } from '../../src/core/core.module.js';
import { createLogger } from '../../src/core/logger.js';
import { type BullmqJobQueueOptions, JOBS_QUEUE_NAME } from '../../src/jobs/bullmq-job-queue.js';
import { BullmqJobsModule } from '../../src/jobs/bullmq-jobs.module.js';
import { InlineJobQueue } from '../../src/jobs/inline-job-queue.js';
import { exponentialBackoff, JobQueue, settlesWithin } from '../../src/jobs/job-queue.js';
import { jobQueueContract } from '../../src/jobs/testing/job-queue.contract.js';
import { REDIS_URL } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';
import { startRedisProxy, uniqueRedisPrefix } from '../support/redis.js';

jobQueueContract('inline', (options) => {
  const queue = new InlineJobQueue(options);
  return Promise.resolve({ queue, cleanup: () => queue.close() });
});

/** Removes every key under a prefix (the queue's own connection is closed by then). */
async function dropKeys(prefix: string): Promise<void> {
  const redis = new Redis(REDIS_URL);
  try {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.unlink(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
}

@Module({})
class BullmqQueueRoot {}

/** The bullmq driver wired as the app wires it (@nestjs/bullmq), in a Nest context of its own. */
async function openBullmqQueue(options: BullmqJobQueueOptions): Promise<{ queue: JobQueue; close: () => Promise<void> }> {
  const app: INestApplicationContext = await NestFactory.createApplicationContext(
    { module: BullmqQueueRoot, imports: [CoreModule.forRoot(createLogger('silent')), BullmqJobsModule.forRoot(options)] },
    { logger: false },
  );
  const queue = app.get(JobQueue);
  return {
    queue,
    close: async () => {
      await queue.close();
      await app.close();
    },
  };
}

// The real Redis on this machine; each queue gets its own prefix.
jobQueueContract('bullmq', async (options) => {
  const prefix = `${uniqueRedisPrefix('jobs')}bull`;
  const { queue, close } = await openBullmqQueue({ ...options, redisUrl: REDIS_URL, prefix });
  await queue.ready();
  return {
    queue,
    cleanup: async () => {
      await close();
      await dropKeys(prefix);
    },
  };
});

describe('BullmqJobQueue shutdown with a job that ignores the abort', () => {
  // The contract checks that the shutdown is prompt; this is what it leaves in Redis, and who runs the job next.
  it('leaves the job active in Redis, untouched by the run’s late end, and another worker’s stalled-job check takes it over untried', async () => {
    const prefix = `${uniqueRedisPrefix('jobs-let-go')}bull`;
    const { queue, close } = await openBullmqQueue({
      redisUrl: REDIS_URL,
      prefix,
      concurrency: 1,
      maxQueued: 10,
      maxTries: 1,
      backoff: () => 10,
      shutdownGraceMs: 200,
    });
    const redis = new Redis(REDIS_URL);
    const key = (name: string) => `${prefix}:${JOBS_QUEUE_NAME}:${name}`;
    const id = '00000000-0000-4000-8000-0000000c1053';
    const abandoned: string[] = [];
    let endRun: (() => void) | undefined;
    let rescuer: Worker | undefined;
    try {
      await queue.ready();
      // Does not listen to its signal; ends (successfully) only after the shutdown.
      queue.start({
        run: () => new Promise<void>((resolve) => (endRun = resolve)),
        abandon: (jobId) => {
          abandoned.push(jobId);
          return Promise.resolve();
        },
      });
      await queue.submit(id);
      await pollUntil(() => expect(endRun).toBeDefined());
      await queue.stop();
      // The app's shutdown: @nestjs/bullmq closes the worker again.
      expect(await settlesWithin(close(), 3_000)).toBe(true);
      // Neither completed nor failed (either would remove it: removeOnComplete, removeOnFail).
      expect(await redis.lrange(key('active'), 0, -1)).toEqual([id]);
      expect(await redis.exists(key(id))).toBe(1);
      endRun!();
      await new Promise((r) => setTimeout(r, 100));
      expect(await redis.lrange(key('active'), 0, -1)).toEqual([id]);
      expect(await redis.exists(key(id))).toBe(1);
      // Its lock, which nobody renews, would expire within BullMQ's lock duration (30 s), and the
      // queue-wide stalled-check mark the closed worker set within its stalled interval (30 s):
      // both dropped here instead of waited for.
      expect(await redis.pttl(key(`${id}:lock`))).toBeGreaterThan(0);
      await redis.del(key(`${id}:lock`), key('stalled-check'));
      const seen: Array<{ id: string | undefined; attemptsMade: number }> = [];
      rescuer = new Worker(JOBS_QUEUE_NAME, (job) => Promise.resolve(void seen.push({ id: job.id, attemptsMade: job.attemptsMade })), {
        connection: { url: REDIS_URL },
        prefix,
        stalledInterval: 200,
      });
      await pollUntil(() => expect(seen).toEqual([{ id, attemptsMade: 0 }]));
      expect(abandoned).toEqual([]);
    } finally {
      endRun?.();
      await rescuer?.close();
      redis.disconnect();
      await dropKeys(prefix);
    }
  });
});

// The bound is counted and held in Redis by one script per submit: instances sharing a queue
// cannot overshoot it together, and a submit that never adds its job does not keep its place.
describe('BullmqJobQueue bound (JOBS_MAX_QUEUED) in Redis', () => {
  const open = (prefix: string, maxQueued: number) =>
    openBullmqQueue({ redisUrl: REDIS_URL, prefix, concurrency: 1, maxQueued, maxTries: 3, backoff: () => 10 });

  it('admits at most the bound between two instances submitting at once, and holds no place once their adds are answered', async () => {
    const prefix = `${uniqueRedisPrefix('jobs-bound')}bull`;
    const key = (name: string) => `${prefix}:${JOBS_QUEUE_NAME}:${name}`;
    const one = await open(prefix, 3);
    const two = await open(prefix, 3);
    const redis = new Redis(REDIS_URL);
    try {
      await Promise.all([one.queue.ready(), two.queue.ready()]);
      const outcomes = await Promise.allSettled(
        Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? one : two).queue.submit(`00000000-0000-4000-8000-0000000b${String(i).padStart(4, '0')}`)),
      );
      expect(outcomes.filter((o) => o.status === 'fulfilled')).toHaveLength(3);
      for (const o of outcomes) if (o.status === 'rejected') expect(o.reason).toMatchObject({ code: 'queue_full', status: 503 });
      expect(await redis.llen(key('wait'))).toBe(3);
      await pollUntil(async () => expect(await redis.exists(key('admitting'))).toBe(0));
    } finally {
      redis.disconnect();
      await one.close();
      await two.close();
      await dropKeys(prefix);
    }
  });

  it('gives back the place of a submit whose add fails, and lets the place of an instance that died mid-submit lapse', async () => {
    const prefix = `${uniqueRedisPrefix('jobs-bound-holds')}bull`;
    const key = (name: string) => `${prefix}:${JOBS_QUEUE_NAME}:${name}`;
    const { queue, close } = await open(prefix, 2);
    const redis = new Redis(REDIS_URL);
    try {
      await queue.ready();
      // Held 31 s ago by submits whose instance never added their jobs (30 s is the lapse).
      const [seconds] = await redis.time();
      await redis.zadd(key('admitting'), (Number(seconds) - 31) * 1000, 'died-mid-submit-1', (Number(seconds) - 31) * 1000, 'died-mid-submit-2');
      // BullMQ refuses an integer job id once admitted, before anything is added.
      await expect(queue.submit('42')).rejects.toMatchObject({ code: 'unavailable' });
      await queue.submit('00000000-0000-4000-8000-0000000b0001');
      await queue.submit('00000000-0000-4000-8000-0000000b0002');
      await expect(queue.submit('00000000-0000-4000-8000-0000000b0003')).rejects.toMatchObject({ code: 'queue_full' });
      expect(await redis.llen(key('wait'))).toBe(2);
    } finally {
      redis.disconnect();
      await close();
      await dropKeys(prefix);
    }
  });
});

describe('BullmqJobQueue without Redis', () => {
  it('refuses submits at once with 503 unavailable, says degraded in readiness, and closes without hanging', async () => {
    // Port 1: nothing listens there, the connection is refused over and over.
    const { queue, close } = await openBullmqQueue({
      redisUrl: 'redis://127.0.0.1:1',
      prefix: uniqueRedisPrefix('jobs-down'),
      concurrency: 1,
      maxQueued: 10,
      maxTries: 3,
      backoff: () => 10,
    });
    try {
      expect(() => queue.assertAccepting()).toThrow(expect.objectContaining({ code: 'unavailable', status: 503 }));
      await expect(queue.submit('00000000-0000-4000-8000-000000000001')).rejects.toMatchObject({ code: 'unavailable' });
      await expect(queue.requeue('00000000-0000-4000-8000-000000000001')).rejects.toMatchObject({ code: 'unavailable' });
      expect(await queue.health()).toMatchObject({ state: 'degraded', details: { driver: 'bullmq', redis: 'unreachable' } });
      queue.start({ run: () => Promise.resolve(), abandon: () => Promise.resolve() });
    } finally {
      await close();
    }
  });
});

describe('BullmqJobQueue with a Redis that stops answering', () => {
  it('says degraded within a kubelet probe’s default 1 s timeout while Redis holds the connection without answering, and up once it answers again', async () => {
    const proxy = await startRedisProxy();
    const prefix = uniqueRedisPrefix('jobs-frozen');
    const { queue, close } = await openBullmqQueue({ redisUrl: proxy.url, prefix, concurrency: 1, maxQueued: 10, maxTries: 3, backoff: () => 10 });
    try {
      await queue.ready();
      expect(await queue.health()).toMatchObject({ state: 'up' });
      proxy.freeze();
      // The probe's side of it: an answer after 1 s is no answer (Kubernetes' timeoutSeconds default).
      let timer: NodeJS.Timeout | undefined;
      const probeTimeout = new Promise<'probe timed out'>((resolve) => {
        timer = setTimeout(() => resolve('probe timed out'), 1000);
      });
      const probe = await Promise.race([queue.health(), probeTimeout]);
      clearTimeout(timer);
      expect(probe).toMatchObject({ state: 'degraded', details: { driver: 'bullmq', redis: 'Redis did not answer within 500 ms' } });
      proxy.thaw();
      expect(await queue.health()).toMatchObject({ state: 'up' });
    } finally {
      proxy.thaw();
      await close();
      await proxy.stop();
      await dropKeys(prefix);
    }
  });
});

describe('exponentialBackoff', () => {
  it('doubles from the base up to the cap, with jitter in the upper half', () => {
    const low = exponentialBackoff(100, 1000, () => 0);
    const high = exponentialBackoff(100, 1000, () => 1);
    expect([1, 2, 3, 4, 5, 6].map(low)).toEqual([50, 100, 200, 400, 500, 500]);
    expect([1, 2, 3, 4, 5, 6].map(high)).toEqual([100, 200, 400, 800, 1000, 1000]);
  });
});
