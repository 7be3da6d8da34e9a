import { type BeforeApplicationShutdown, Injectable, type OnModuleInit } from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import type { FastifyReply } from 'fastify';
import type { Server } from 'node:http';
import type { Logger } from 'pino';
import type { CompletionCall } from '../completion/completion.types.js';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';

/** After the deadline has ended the streams, how long their last writes and settles may take. */
export const END_GRACE_MS = 2000;

/** The abort reason a stream sees when the drain deadline ends it. */
export class ShuttingDown extends Error {
  constructor() {
    super('the gateway is shutting down');
    this.name = 'ShuttingDown';
  }
}

/**
 * Graceful shutdown for Kubernetes. On SIGTERM (or app.close()) Nest runs
 * `beforeApplicationShutdown` while the server still listens:
 *
 *   1. readiness turns 503 at once, so load balancers stop sending; responses say `connection: close`;
 *   2. in-flight requests and streams may finish, for up to SHUTDOWN_DRAIN_MS;
 *   3. streams still open then end with an SSE error event and [DONE]; after END_GRACE_MS the
 *      connections of anything still running are closed;
 *   4. Nest closes the HTTP server, then `onApplicationShutdown` closes the database, Redis and
 *      the upstream pool (their modules' own hooks).
 *
 * Requests are counted from Fastify's onRequest hook until their response closes, finished or
 * abandoned, so every door (JSON, SSE, admin) is covered by one counter.
 */
@Injectable()
export class ShutdownService implements OnModuleInit, BeforeApplicationShutdown {
  private readonly logger: Logger;
  private inFlight = 0;
  private draining = false;
  /** Epoch ms of SIGTERM (or app.close()). */
  private drainStartedAt: number | undefined;
  private readonly deadline = new AbortController();
  /** Streams the deadline ends (drainable, not drained yet). */
  private readonly streams = new Set<CompletionCall>();
  private onIdle: (() => void) | undefined;
  private readonly release = (): void => {
    this.inFlight -= 1;
    if (this.inFlight === 0) this.onIdle?.();
  };

  constructor(
    private readonly config: AppConfig,
    private readonly readiness: ReadinessRegistry,
    private readonly adapterHost: HttpAdapterHost,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Shutdown' });
  }

  onModuleInit(): void {
    this.readiness.register('shutdown', () =>
      Promise.resolve(this.draining ? { state: 'down', details: { draining: true, in_flight: this.inFlight } } : { state: 'up', details: { draining: false } }),
    );
  }

  get isDraining(): boolean {
    return this.draining;
  }

  /**
   * Until when the batched writers' last flush may keep retrying a database that refuses: the
   * drain's own budget, counted from SIGTERM (the grace period the operator gave the pod covers
   * it). What they still hold after it is lost, and logged as such.
   */
  writeDeadline(): number {
    return (this.drainStartedAt ?? Date.now()) + this.config.shutdown.drainMs;
  }

  /** Fastify onRequest: counts the request until its response closes. */
  track(reply: FastifyReply): void {
    this.inFlight += 1;
    // Keep-alive clients and proxies move to another instance after this answer.
    if (this.draining) void reply.header('connection', 'close');
    reply.raw.once('close', this.release);
  }

  /**
   * Makes a stream's call also end when the drain deadline passes; `drained(call)` when it is
   * over. The call is kept in a set and aborted through its door's own controller: a composite
   * `AbortSignal.any` per stream cost ~13 µs of CPU (weak references the GC must sweep), ~3% of
   * a streamed miss. A call without `abort` (none streams today) gets the composite signal.
   * The call itself is changed, never a copy: what the pipeline notes on it (`audited`) must
   * reach the HTTP door's hooks, which hold it.
   */
  drainable(call: CompletionCall): void {
    if (!call.abort) {
      call.signal = AbortSignal.any([call.signal, this.deadline.signal]);
    } else if (this.deadline.signal.aborted) {
      call.abort(this.deadline.signal.reason);
    } else {
      this.streams.add(call);
    }
  }

  drained(call: CompletionCall): void {
    this.streams.delete(call);
  }

  /** The in-band error for a stream the drain deadline ended; undefined when something else ended it. */
  streamEndedError(): GatewayError | undefined {
    return this.deadline.signal.aborted
      ? new GatewayError('unavailable', 'The gateway is shutting down and ended this stream before it finished; retry the request.')
      : undefined;
  }

  async beforeApplicationShutdown(signal?: string): Promise<void> {
    if (this.draining) return;
    this.draining = true;
    this.drainStartedAt = Date.now();
    const started = performance.now();
    const drainMs = this.config.shutdown.drainMs;
    this.logger.info({ signal, inFlight: this.inFlight, drainMs }, 'draining: readiness is down, in-flight requests may finish');
    if (!(await this.idleWithin(drainMs))) {
      this.logger.warn({ inFlight: this.inFlight, drainMs }, 'drain deadline passed: ending the streams still open');
      this.deadline.abort(new ShuttingDown());
      for (const call of this.streams) call.abort?.(this.deadline.signal.reason);
      if (!(await this.idleWithin(END_GRACE_MS))) {
        this.logger.warn({ inFlight: this.inFlight }, 'closing the connections of requests still running');
        const server = this.adapterHost.httpAdapter?.getHttpServer() as Server | undefined;
        server?.closeAllConnections();
      }
    }
    this.logger.info({ ms: Math.round(performance.now() - started), inFlight: this.inFlight }, 'drained');
  }

  private idleWithin(ms: number): Promise<boolean> {
    if (this.inFlight === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.onIdle = undefined;
        resolve(false);
      }, ms);
      this.onIdle = () => {
        clearTimeout(timer);
        this.onIdle = undefined;
        resolve(true);
      };
    });
  }
}
