import { EventEmitter } from 'node:events';
import type { HttpAdapterHost } from '@nestjs/core';
import type { FastifyReply } from 'fastify';
import { describe, expect, it } from 'vitest';
import type { CompletionCall } from '../completion/completion.types.js';
import type { AppConfig } from '../config/config.js';
import { createLogger } from '../core/logger.js';
import { pollUntil } from '../core/testing/poll-until.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { ShutdownService, ShuttingDown } from './shutdown.service.js';

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
    service.track({ raw, header: () => undefined } as unknown as FastifyReply);
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
