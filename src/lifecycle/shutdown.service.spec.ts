import { EventEmitter } from 'node:events';
import type { HttpAdapterHost } from '@nestjs/core';
import type { FastifyReply } from 'fastify';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { CompletionCall } from '../completion/completion.types.js';
import type { AppConfig } from '../config/config.js';
import { createLogger } from '../core/logger.js';
import { pollUntil } from '../core/testing/poll-until.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { CLOSE_GRACE_MS, LAST_FLUSH_MS, ShutdownService, ShuttingDown } from './shutdown.service.js';

function streamCall(): CompletionCall {
  const controller = new AbortController();
  return { signal: controller.signal, abort: (reason) => controller.abort(reason) } as CompletionCall;
}

describe('ShutdownService: streams and the drain deadline', () => {
  it('ends the streams still open at the deadline, not those already over, and at once any begun after it', async () => {
    const config = { shutdown: { drainMs: 100 } } as unknown as AppConfig;
    const service = new ShutdownService(config, new ReadinessRegistry(), { httpAdapter: undefined } as unknown as HttpAdapterHost, {
      logger: createLogger('silent'),
    });
    // One request in flight keeps the drain waiting until its deadline.
    const raw = new EventEmitter();
    service.track({ raw, header: () => undefined, request: {} } as unknown as FastifyReply);
    const open = streamCall();
    const over = streamCall();
    service.drainable(open);
    service.drainable(over);
    service.drained(over);

    const drain = service.beforeApplicationShutdown('SIGTERM');
    // Draining alone ends nothing: in-flight streams may finish until the deadline.
    expect(open.signal.aborted).toBe(false);
    await pollUntil(() => expect(open.signal.aborted).toBe(true));
    expect(open.signal.reason).toBeInstanceOf(ShuttingDown);
    expect(service.streamEndedError()?.code).toBe('unavailable');
    expect(over.signal.aborted).toBe(false);

    const late = streamCall();
    service.drainable(late);
    expect(late.signal.reason).toBeInstanceOf(ShuttingDown);

    service.drained(open);
    raw.emit('close');
    await drain;
  });

  it('before any deadline, a drainable stream is left alone and no error is reported for it', () => {
    const service = new ShutdownService({ shutdown: { drainMs: 30 } } as unknown as AppConfig, new ReadinessRegistry(), {} as HttpAdapterHost, {
      logger: createLogger('silent'),
    });
    const call = streamCall();
    service.drainable(call);
    expect(call.signal.aborted).toBe(false);
    expect(service.streamEndedError()).toBeUndefined();
  });
});

/** A response Fastify tracks: `raw` emits 'close' when it is over; `request` carries the door's call. */
function trackedReply(call?: CompletionCall): { reply: FastifyReply; raw: EventEmitter & { writableFinished: boolean } } {
  const raw = Object.assign(new EventEmitter(), { writableFinished: false });
  return { reply: { raw, header: () => undefined, request: { completionCall: call } } as unknown as FastifyReply, raw };
}

function shutdownService(drainMs: number, server?: { closeAllConnections(): void }, readiness = new ReadinessRegistry()): ShutdownService {
  return new ShutdownService(
    { shutdown: { drainMs } } as unknown as AppConfig,
    readiness,
    { httpAdapter: { getHttpServer: () => server } } as unknown as HttpAdapterHost,
    {
      logger: createLogger('silent'),
    },
  );
}

describe('ShutdownService: the drain and what comes after it', () => {
  afterEach(() => {
    vi.useRealTimers();
    vi.restoreAllMocks();
  });

  it('starts draining in onModuleDestroy, before any module runs its beforeApplicationShutdown', async () => {
    const readiness = new ReadinessRegistry();
    const service = shutdownService(60_000, undefined, readiness);
    service.onModuleInit();
    const { reply, raw } = trackedReply();
    service.track(reply);

    // Nest runs every onModuleDestroy first, then beforeApplicationShutdown module by module:
    // a hook ordered before this one (a flush waiting on the database) must not keep readiness up.
    service.onModuleDestroy();
    expect(service.isDraining).toBe(true);
    expect((await readiness.checks.get('shutdown')?.())?.state).toBe('down');

    const drain = service.beforeApplicationShutdown('SIGTERM');
    raw.emit('close');
    await drain;
  });

  it('after closing the connections of calls still running, waits until they have settled', async () => {
    const cut = { audited: false } as CompletionCall;
    const { reply, raw } = trackedReply(cut);
    let settledAt: number | undefined;
    const server = {
      closeAllConnections: () => {
        // As Node does: the response reports 'close' a tick later, and the pipeline, its signal
        // aborted, settles and records the call a little after that.
        setImmediate(() => raw.emit('close'));
        setTimeout(() => {
          cut.audited = true;
          settledAt = performance.now();
        }, 100);
      },
    };
    const service = shutdownService(50, server);
    service.track(reply);

    await service.beforeApplicationShutdown('SIGTERM');
    // Before the fix the drain returned at once, and the writers' last flush ran before the settle.
    expect(settledAt).toBeDefined();
  });

  it('gives a writer whose turn comes after a full drain at least LAST_FLUSH_MS, and no deadline beyond the drain otherwise', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'Date', 'performance'] });
    const service = shutdownService(1000);
    const sigterm = Date.now();
    const drain = service.beforeApplicationShutdown('SIGTERM');
    expect(service.writeDeadline()).toBe(sigterm + 1000);
    await drain;
    await vi.advanceTimersByTimeAsync(5000);
    expect(service.writeDeadline()).toBe(Date.now() + LAST_FLUSH_MS);
  });

  it('after a signal, exits CLOSE_GRACE_MS after the writers flushed even if a pool never finishes closing; never after app.close()', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'Date'] });
    const exit = vi.spyOn(process, 'exit').mockImplementation((() => undefined) as never);
    const closed = shutdownService(0);
    await closed.beforeApplicationShutdown();
    closed.onApplicationShutdown();
    await vi.advanceTimersByTimeAsync(CLOSE_GRACE_MS * 10);
    expect(exit).not.toHaveBeenCalled();

    const signalled = shutdownService(0);
    await signalled.beforeApplicationShutdown('SIGTERM');
    signalled.onApplicationShutdown('SIGTERM');
    await vi.advanceTimersByTimeAsync(CLOSE_GRACE_MS - 1);
    expect(exit).not.toHaveBeenCalled();
    await vi.advanceTimersByTimeAsync(1);
    expect(exit).toHaveBeenCalledWith(0);
  });
});
