import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { AppConfig } from '../config/config.js';
import { withTimeout } from '../core/deadline.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { RespClient, type RespClientOptions } from './resp-client.js';

const PING_TIMEOUT_MS = 500;
const STARTUP_WAIT_MS = 2000;

/**
 * Options that keep a dead or slow Redis from stalling requests: nothing is queued while
 * disconnected (a command fails at once and the caller falls back), connecting gives up quickly,
 * and a server that stops answering for a second is dropped and reconnected.
 */
export const FAIL_FAST_OPTIONS: Omit<RespClientOptions, 'name'> = {
  connectTimeoutMs: 1000,
  commandTimeoutMs: 1000,
  retryDelayMs: (times: number) => Math.min(50 * 2 ** Math.min(times, 6), 2000),
};

/**
 * The Redis command connection of the cache and rate-limit drivers (REDIS_URL): in memory mode
 * this class is never constructed, so no connection exists. One shared connection serves both
 * drivers; it is the gateway's own lean client (resp-client.ts), not ioredis, because it carries
 * commands on every request's path. BullMQ opens its own ioredis connections (jobs module).
 */
@Injectable()
export class RedisConnections implements OnModuleInit, OnApplicationShutdown {
  readonly keyPrefix: string;
  private readonly url: string;
  private readonly logger: Logger;
  private sharedClient: RespClient | undefined;
  private readonly subscribers: RespClient[] = [];
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
        await withTimeout(client.call('PING'), PING_TIMEOUT_MS, () => new Error(`Redis did not answer within ${PING_TIMEOUT_MS} ms`));
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
  shared(): RespClient {
    this.sharedClient ??= this.open('shared');
    return this.sharedClient;
  }

  /**
   * A connection of its own that hears what is published on `channel` (re-subscribed after every
   * reconnect). Messages sent while it is down are lost: users must treat them as hints.
   */
  subscriber(channel: string, onMessage: (payload: string) => void, name: string): RespClient {
    const client = this.open(name, { channel, onMessage });
    this.subscribers.push(client);
    return client;
  }

  private open(name: string, subscribe?: RespClientOptions['subscribe']): RespClient {
    const client = new RespClient(this.url, { ...FAIL_FAST_OPTIONS, name: `gatehouse-${name}`, subscribe });
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
    // One line per outage is enough.
    client.on('error', (error: Error) => {
      if (errorLogged) return;
      errorLogged = true;
      this.logger.warn({ connection: name, err: error.message }, 'Redis error');
    });
    return client;
  }

  async onApplicationShutdown(): Promise<void> {
    this.closing = true;
    // quit() waits for replies already pending, at most a second: a hung server never holds shutdown.
    await this.sharedClient?.quit(1000);
    this.sharedClient = undefined;
    for (const client of this.subscribers.splice(0)) client.disconnect();
  }
}

/** Resolves once the client is ready (commands fail until then: there is no offline queue). */
export function whenReady(client: RespClient, timeoutMs: number): Promise<void> {
  if (client.status === 'ready') return Promise.resolve();
  return withTimeout(
    new Promise<void>((resolve) => {
      client.once('ready', () => resolve());
    }),
    timeoutMs,
    () => new Error(`Redis did not answer within ${timeoutMs} ms`),
  );
}
