import { randomBytes } from 'node:crypto';
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import type { AppConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { ReadinessRegistry } from '../../src/health/readiness.js';
import { RedisConnections, whenReady } from '../../src/redis/redis-connections.js';
import { escapeGlob, unlinkMatching } from '../../src/redis/unlink-matching.js';
import { REDIS_URL } from './databases.js';

/** A key prefix no other test (or test run) uses, so tests can share the machine's Redis. */
export function uniqueRedisPrefix(tag = 't'): string {
  return `gh-test:${tag}:${process.pid}:${randomBytes(4).toString('hex')}:`;
}

/** RedisConnections as the app builds it, outside Nest, with its shared client ready. */
export async function openTestRedis(prefix: string, url = REDIS_URL): Promise<RedisConnections> {
  const config = { redisUrl: url, redisKeyPrefix: prefix } as unknown as AppConfig;
  const connections = new RedisConnections(config, { logger: createLogger('silent') }, new ReadinessRegistry());
  await whenReady(connections.shared(), 5000);
  return connections;
}

/**
 * Resolves once Redis has run every command this instance sent before. A cache fill goes out
 * without waiting for a reply (RespClient.fire), so `store()` resolving does not mean another
 * connection can read it yet; Redis answers this connection's PING only after the fill ran.
 */
export async function sentCommandsRan(connections: RedisConnections): Promise<void> {
  await connections.shared().call('PING');
}

/** Deletes every key under a test prefix. */
export async function dropRedisPrefix(connections: RedisConnections): Promise<void> {
  await unlinkMatching(connections.shared(), `${escapeGlob(connections.keyPrefix)}*`);
}

/**
 * Removes what a gateway left in the shared Redis under `prefix` (BullMQ's meta keys and event
 * stream, cache, counters), through connections of its own: the gateway may already be gone.
 */
export async function dropRedisKeys(prefix: string): Promise<void> {
  const redis = await openTestRedis(prefix);
  await dropRedisPrefix(redis);
  await redis.onApplicationShutdown();
}

export interface TcpProxy {
  /** The target's URL with the proxy's port in it. */
  readonly url: string;
  /** Drops every connection and stops listening: to the gateway, the server is gone. */
  stop(): Promise<void>;
  /** Listens again on the same port: the server is back. */
  start(): Promise<void>;
  /** Connections stay open but nothing passes either way: a server that hangs (or a network that drops packets). */
  freeze(): void;
  /** What was held back is delivered and traffic flows again. */
  thaw(): void;
  /** Bytes the server sent to the relay since it started (or since `resetReceived`). */
  received(): number;
  resetReceived(): void;
}

export interface TcpProxyOptions {
  /**
   * Rewrites what clients send before it reaches the server (a proxy that speaks the protocol but
   * handles some commands its own way). Applied per chunk, as latin1 text.
   */
  rewriteFromClient?: (text: string) => string;
}

/** A loopback TCP relay to the test Redis, to take Redis away from a running gateway and back. */
export function startRedisProxy(target = REDIS_URL, options: TcpProxyOptions = {}): Promise<TcpProxy> {
  return startTcpProxy(target, options);
}

/** A loopback TCP relay to the server of `target` (any URL with host and port). */
export async function startTcpProxy(target: string, options: TcpProxyOptions = {}): Promise<TcpProxy> {
  const targetUrl = new URL(target);
  const defaultPort = targetUrl.protocol.startsWith('redis') ? 6379 : 5432;
  const sockets = new Set<Socket>();
  let server: Server | undefined;
  let port = 0;
  let frozen = false;
  const held: Array<[Socket, Buffer]> = [];
  let received = 0;
  const relay = (from: Socket, to: Socket, transform: (chunk: Buffer) => Buffer = (chunk) => chunk) =>
    from.on('data', (raw: Buffer) => {
      const chunk = transform(raw);
      if (frozen) held.push([to, chunk]);
      else to.write(chunk);
    });
  const rewrite = options.rewriteFromClient;
  const fromClient = rewrite ? (chunk: Buffer) => Buffer.from(rewrite(chunk.toString('latin1')), 'latin1') : undefined;
  const fromServer = (chunk: Buffer) => {
    received += chunk.length;
    return chunk;
  };
  const listen = () =>
    new Promise<void>((resolve, reject) => {
      const s = createServer((client) => {
        const upstream = connect(Number(targetUrl.port || defaultPort), targetUrl.hostname);
        sockets.add(client);
        sockets.add(upstream);
        const drop = () => {
          client.destroy();
          upstream.destroy();
          sockets.delete(client);
          sockets.delete(upstream);
        };
        client.on('error', drop).on('close', drop);
        upstream.on('error', drop).on('close', drop);
        relay(client, upstream, fromClient);
        relay(upstream, client, fromServer);
      });
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => {
        port = (s.address() as AddressInfo).port;
        server = s;
        resolve();
      });
    });
  await listen();
  return {
    get url() {
      const url = new URL(target);
      url.hostname = '127.0.0.1';
      url.port = String(port);
      return url.toString();
    },
    async stop() {
      const s = server;
      server = undefined;
      for (const socket of sockets) socket.destroy();
      sockets.clear();
      if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
    },
    start: listen,
    freeze() {
      frozen = true;
    },
    thaw() {
      frozen = false;
      for (const [to, chunk] of held.splice(0)) if (!to.destroyed) to.write(chunk);
    },
    received: () => received,
    resetReceived() {
      received = 0;
    },
  };
}
