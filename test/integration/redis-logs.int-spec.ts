import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import type { AppConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { ReadinessRegistry } from '../../src/health/readiness.js';
import { JobsRedisLog } from '../../src/jobs/bullmq-job-queue.js';
import { RedisConnections, whenReady } from '../../src/redis/redis-connections.js';
import { REDIS_URL } from '../support/databases.js';
import { startRedisProxy, uniqueRedisPrefix } from '../support/redis.js';

// What operators read about Redis: an outage and its end, not an orderly shutdown.

function capture() {
  const messages: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      messages.push((JSON.parse(chunk.toString()) as { msg: string }).msg);
      done();
    },
  });
  return { appLogger: { logger: createLogger('info', sink) }, messages };
}

describe('Redis connection logs (real Redis)', () => {
  it('says nothing about a lost connection when shutdown closes it, and does when the server goes away', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    const { appLogger, messages } = capture();
    const config = { redisUrl: proxy.url, redisKeyPrefix: uniqueRedisPrefix('logs') } as unknown as AppConfig;
    const connections = new RedisConnections(config, appLogger, new ReadinessRegistry());
    try {
      await whenReady(connections.shared(), 5000);
      await proxy.stop();
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(messages).toContain('Redis connection lost; reconnecting');
      await proxy.start();
      await whenReady(connections.shared(), 5000);
      messages.length = 0;
      await connections.onApplicationShutdown();
      await new Promise((resolve) => setTimeout(resolve, 100));
      expect(messages).not.toContain('Redis connection lost; reconnecting');
    } finally {
      await connections.onApplicationShutdown();
      await proxy.stop();
    }
  });

  it('logs the job queue connection coming back once after a problem', () => {
    const { appLogger, messages } = capture();
    const log = new JobsRedisLog(appLogger);
    log.ready('producer');
    log.problem('producer', new Error('connect ECONNREFUSED'));
    log.problem('queue', new Error('connect ECONNREFUSED'));
    log.ready('producer');
    log.ready('producer');
    expect(messages).toEqual(['job queue Redis connection problem', 'job queue Redis connection back']);
  });
});
