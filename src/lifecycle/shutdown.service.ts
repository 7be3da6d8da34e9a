import { type BeforeApplicationShutdown, Injectable, type OnApplicationShutdown, type OnModuleDestroy, type OnModuleInit } from '@nestjs/common';
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
/**
 * After the drain, how long calls whose connection closed before their pipeline was over (cut at
 * the deadline, or left by their client) may take to queue their settle and audit event: the
 * writers' last flush comes next, and a settle queued after it is lost. An aborted call gets
 * there within milliseconds (its upstream request is cancelled at once); this bounds a stuck one.
 */
export const SETTLE_GRACE_MS = 1000;

/**
 * As the server closes, how long the streams still open may take to write their error event and
 * [DONE] before their connections are closed: one write each, so short (the exit budget is fixed).
 */
const STREAM_END_MS = 500;
/**
 * The least time a writer's last flush gets, even past SIGTERM + SHUTDOWN_DRAIN_MS (a drain that
 * used all of it): a few tries against a database that refuses, or one that does not answer.
 */
export const LAST_FLUSH_MS = 1000;
/**
 * After the writers' last flush (what they could not store is logged as lost by then), how long
 * closing the pools, Redis and the tracer may take before a process ended by a signal exits
 * anyway: a pool waits for a statement the last flush gave up on for its query timeout (35 s),
 * past the pod's grace period, and the kubelet's SIGKILL would drop the last log lines.
 */
export const CLOSE_GRACE_MS = 2000;
const SETTLE_POLL_MS = 10;

/** The abort reason a stream sees when the drain deadline ends it. */
export class ShuttingDown extends Error {
  constructor() {
    super('the gateway is shutting down');
    this.name = 'ShuttingDown';
  }
}

/**
 * Graceful shutdown for Kubernetes. On SIGTERM (or app.close()), while the server still listens:
 *
 *   1. readiness turns 503 at once, so load balancers stop sending; responses say `connection: close`;
 *   2. in-flight requests and streams may finish, for up to SHUTDOWN_DRAIN_MS;
 *   3. streams still open then end with an SSE error event and [DONE]; after END_GRACE_MS the
 *      connections of anything still running are closed, and those calls get SETTLE_GRACE_MS to
 *      queue their settle and audit event;
 *   4. Nest closes the HTTP server, then `onApplicationShutdown` flushes the writers (each within
 *      `writeDeadline()`) and closes the database, Redis and the upstream pool (their modules' own
 *      hooks); after a signal, the process exits at most CLOSE_GRACE_MS after the writers' flush.
 *
 * The drain starts in `onModuleDestroy`, which Nest runs for every module before any
 * `beforeApplicationShutdown`: these run module by module, and the hooks of modules ordered before
 * this one (the job workers waiting for their jobs, the audit flush) would otherwise hold the
 * drain back, with readiness still up, for as long as they take (15-60 s on a database that stopped
 * answering).
 *
 * Requests are counted from Fastify's onRequest hook until their response closes, finished or
 * abandoned, so every door (JSON, SSE, admin) is covered by one counter.
 */
@Injectable()
export class ShutdownService implements OnModuleInit, OnModuleDestroy, BeforeApplicationShutdown, OnApplicationShutdown {
  private readonly logger: Logger;
  private inFlight = 0;
  private draining = false;
  /** Epoch ms of SIGTERM (or app.close()). */
  private drainStartedAt: number | undefined;
  private drain: Promise<void> | undefined;
  private readonly deadline = new AbortController();
  /** Streams the deadline ends (drainable, not drained yet). */
  private readonly streams = new Set<CompletionCall>();
  /** JSON calls whose response closed unfinished during the drain, until their pipeline recorded them (`audited`). */
  private readonly unsettled = new Set<CompletionCall>();
  private onIdle: (() => void) | undefined;

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
   * Until when a batched writer's last flush may keep trying a database that refuses or does not
   * answer: the drain's own budget, counted from SIGTERM (the grace period the operator gave the
   * pod covers it), and at least LAST_FLUSH_MS from now. No attempt runs past it: what the writer
   * still holds then is lost, and logged as such.
   */
  writeDeadline(): number {
    const now = Date.now();
    return Math.max((this.drainStartedAt ?? now) + this.config.shutdown.drainMs, now + LAST_FLUSH_MS);
  }

  /**
   * Told of a response whose connection closed before it finished (the caller left, or the drain
   * deadline closed it): Fastify runs no onResponse hook for it, so whoever counts responses
   * there (the HTTP metrics) counts this one here. Set once at start; it shares the close
   * listener every request already has.
   */
  onUnfinished: ((reply: FastifyReply) => void) | undefined;

  /** Fastify onRequest: counts the request until its response closes. */
  track(reply: FastifyReply): void {
    this.inFlight += 1;
    // Keep-alive clients and proxies move to another instance after this answer.
    if (this.draining) void reply.header('connection', 'close');
    reply.raw.once('close', () => this.release(reply));
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

  onModuleDestroy(): void {
    void this.startDrain();
  }

  async beforeApplicationShutdown(signal?: string): Promise<void> {
    await this.startDrain(signal);
  }

  /**
   * Runs after the writers' hooks (AuditModule and BudgetModule come before LifecycleModule) and
   * before the database, Redis and the tracer close. Only after a signal: Nest ends such a process
   * with process.exit anyway (gateway.ts), while app.close() (tests, embedding) must never exit.
   */
  onApplicationShutdown(signal?: string): void {
    if (signal === undefined) return;
    const timer = setTimeout(() => {
      this.logger.warn({ ms: CLOSE_GRACE_MS }, 'connections still closing after the last writes: exiting without waiting for them');
      process.exit(0);
    }, CLOSE_GRACE_MS);
    timer.unref();
  }

  private startDrain(signal?: string): Promise<void> {
    this.drain ??= this.runDrain(signal);
    return this.drain;
  }

  private async runDrain(signal: string | undefined): Promise<void> {
    this.draining = true;
    this.drainStartedAt = Date.now();
    const started = performance.now();
    const drainMs = this.config.shutdown.drainMs;
    this.logger.info({ signal, inFlight: this.inFlight, drainMs }, 'draining: readiness is down, in-flight requests may finish');
    if (!(await this.idleWithin(drainMs))) {
      this.logger.warn({ inFlight: this.inFlight, drainMs }, 'drain deadline passed: ending the streams still open');
      this.endStreams();
      if (!(await this.idleWithin(END_GRACE_MS))) {
        this.logger.warn({ inFlight: this.inFlight }, 'closing the connections of requests still running');
        this.closeConnections();
      }
    }
    await this.settleCutCalls();
    this.logger.info({ ms: Math.round(performance.now() - started), inFlight: this.inFlight }, 'drained');
  }

  /**
   * As the server closes (Fastify preClose), after the drain: waits for requests accepted since it
   * went idle (a load balancer still sending while later shutdown hooks ran), until the drain's
   * deadline plus END_GRACE_MS, so closing every connection then cuts none of them. Those still
   * running then are cut here rather than by the server's close, and get SETTLE_GRACE_MS to settle
   * as the drain's are: cut by the server's close, their settle came after the writers' last flush
   * (BUDGET CHARGES LOST, the reservation held until the sweeper, no audit row).
   */
  async quiesce(): Promise<void> {
    const deadline = (this.drainStartedAt ?? Date.now()) + this.config.shutdown.drainMs + END_GRACE_MS;
    if (!(await this.idleWithin(Math.max(0, deadline - Date.now())))) {
      this.logger.warn({ inFlight: this.inFlight }, 'closing the server with requests still running');
      // Its streams end as the drain's do, with the SSE error event and [DONE] (API.md), before
      // their connections close: cut bare, a client sees a broken stream, not a failed one.
      if (this.streams.size > 0) {
        this.endStreams();
        await this.streamsEndedWithin(STREAM_END_MS);
      }
      this.closeConnections();
      await this.settleCutCalls();
    }
  }

  /** Each open stream ends with the SSE error event and [DONE] (streamEndedError). */
  private endStreams(): void {
    this.deadline.abort(new ShuttingDown());
    for (const call of this.streams) call.abort?.(this.deadline.signal.reason);
  }

  /** Their calls' signals abort with their responses (the door's 'close' listener). */
  private closeConnections(): void {
    const server = this.adapterHost.httpAdapter?.getHttpServer() as Server | undefined;
    server?.closeAllConnections();
  }

  private async settleCutCalls(): Promise<void> {
    if (!(await this.settledWithin(SETTLE_GRACE_MS))) {
      this.logger.warn(
        { inFlight: this.inFlight, calls: this.unsettled.size + this.streams.size, ms: SETTLE_GRACE_MS },
        'calls cut off by the shutdown have not settled: a charge they queue from now on comes after the last flush',
      );
    }
  }

  private release(reply: FastifyReply): void {
    this.inFlight -= 1;
    const unfinished = !reply.raw.writableFinished;
    if (unfinished) this.onUnfinished?.(reply);
    if (this.draining && unfinished) {
      // Its response is over, not its pipeline: the call still settles its budget and records its
      // audit event, and the writers' last flush must wait for that (settledWithin).
      const call = reply.request.completionCall;
      if (call !== undefined && call.audited !== true) this.unsettled.add(call);
    }
    if (this.inFlight === 0) this.onIdle?.();
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

  /**
   * Whether the calls cut off during the drain are over within `ms`: every response closed, every
   * stream drained, every JSON call recorded by its pipeline (which settles its budget first). Polled, and only here: a
   * notification would cost every request something for the sake of the shutdown.
   */
  private async streamsEndedWithin(ms: number): Promise<void> {
    const until = performance.now() + ms;
    while (this.streams.size > 0 && performance.now() < until) await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
  }

  private async settledWithin(ms: number): Promise<boolean> {
    const until = performance.now() + ms;
    for (;;) {
      for (const call of this.unsettled) if (call.audited === true) this.unsettled.delete(call);
      // inFlight first: the connections just closed report their responses' 'close' a tick later.
      if (this.inFlight === 0 && this.unsettled.size === 0 && this.streams.size === 0) return true;
      if (performance.now() >= until) return false;
      await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
    }
  }
}
