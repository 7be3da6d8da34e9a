import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import { Redis, type RedisOptions } from 'ioredis';
import type { Logger } from 'pino';
import { AppConfig } from '../config/config.js';
import { withTimeout } from '../core/deadline.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';

const PING_TIMEOUT_MS = 500;
const STARTUP_WAIT_MS = 2000;

/**
 * Options that keep a dead or slow Redis from stalling requests: nothing is queued while
 * disconnected (a command fails at once and the caller falls back), connecting gives up quickly,
 * a command is tried once more at most, and a hung server times a command out.
 */
export const FAIL_FAST_OPTIONS: RedisOptions = {
  enableOfflineQueue: false,
  connectTimeout: 1000,
  maxRetriesPerRequest: 1,
  commandTimeout: 1000,
  // Commands issued in the same tick go out in one write: fewer syscalls under load.
  enableAutoPipelining: true,
  retryStrategy: (times: number) => Math.min(50 * 2 ** Math.min(times, 6), 2000),
};

/**
 * The one place that opens Redis connections (REDIS_URL), for the Redis drivers only: in memory
 * mode this class is never constructed, so no connection exists. One shared command connection
 * serves every driver; dedicated ones (subscribers, BullMQ) come from `create()`. All are closed
 * on shutdown.
 */
@Injectable()
export class RedisConnections implements OnModuleInit, OnApplicationShutdown {
  readonly keyPrefix: string;
  private readonly url: string;
  private readonly logger: Logger;
  private readonly opened = new Set<Redis>();
  private sharedClient: Redis | undefined;
  /** Set when shutdown closes the connections: their 'close' is then not an outage. */
  private closing = false;

  constructor(config: AppConfig, appLogger: AppLogger, readiness: ReadinessRegistry) {
    if (!config.redisUrl) throw new Error('a Redis driver was selected without REDIS_URL');
    this.url = config.redisUrl;
    this.keyPrefix = config.redisKeyPrefix;
    this.logger = appLogger.logger.child({ context: 'Redis' });
    readiness.register('redis', async () => {
      const client = this.shared();
      if (client.status !== 'ready')
        return { state: 'degraded', details: { connection: client.status, message: 'Redis unreachable; features run on their fallbacks' } };
      try {
        await withTimeout(client.ping(), PING_TIMEOUT_MS, () => new Error(`Redis did not answer within ${PING_TIMEOUT_MS} ms`));
        return { state: 'up', details: {} };
      } catch (error) {
        return { state: 'degraded', details: { message: (error as Error).message } };
      }
    });
  }

  /**
   * Gives the shared connection a moment to come up before the app listens, so the first
   * requests already share limits and cache. A Redis that is down does not hold the start: the
   * features run on their fallbacks and reconnect in the background.
   */
  async onModuleInit(): Promise<void> {
    const client = this.shared();
    try {
      await whenReady(client, STARTUP_WAIT_MS);
    } catch {
      this.logger.warn({ status: client.status }, 'Redis not reachable at start; continuing on fallbacks (cache bypassed, per-instance rate limits)');
    }
  }

  /** The shared command connection (opened on first use). */
  shared(): Redis {
    this.sharedClient ??= this.create('shared');
    return this.sharedClient;
  }

  /** A dedicated connection with the fail-fast defaults, overridable (BullMQ needs its own). */
  create(name: string, overrides: RedisOptions = {}): Redis {
    const client = new Redis(this.url, { ...FAIL_FAST_OPTIONS, connectionName: `gatehouse-${name}`, ...overrides });
    let connected = false;
    let errorLogged = false;
    client.on('ready', () => {
      connected = true;
      errorLogged = false;
      this.logger.info({ connection: name }, 'Redis connected');
    });
    client.on('close', () => {
      if (connected && !this.closing) this.logger.warn({ connection: name }, 'Redis connection lost; reconnecting');
      connected = false;
    });
    // Without an 'error' listener ioredis would crash the process; one line per outage is enough.
    client.on('error', (error: Error) => {
      if (errorLogged) return;
      errorLogged = true;
      this.logger.warn({ connection: name, err: error.message }, 'Redis error');
    });
    this.opened.add(client);
    return client;
  }

  async onApplicationShutdown(): Promise<void> {
    this.closing = true;
    await Promise.all(
      [...this.opened].map(async (client) => {
        if (client.status === 'ready') {
          // quit() waits for replies already pending; never let a hung server hold shutdown.
          await withTimeout(client.quit(), 1000).catch(() => client.disconnect());
        } else {
          client.disconnect();
        }
      }),
    );
    this.opened.clear();
    this.sharedClient = undefined;
  }
}

/** Resolves once the client is ready (commands fail until then: there is no offline queue). */
export function whenReady(client: Redis, timeoutMs: number): Promise<void> {
  if (client.status === 'ready') return Promise.resolve();
  return withTimeout(
    new Promise<void>((resolve) => {
      client.once('ready', () => resolve());
    }),
    timeoutMs,
    () => new Error(`Redis did not answer within ${timeoutMs} ms`),
  );
}
