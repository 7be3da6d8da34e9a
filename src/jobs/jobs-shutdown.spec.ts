import type { DynamicModule, FactoryProvider, Provider, ValueProvider } from '@nestjs/common';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { loadConfig } from '../config/config.js';
import { BULLMQ_JOB_QUEUE_OPTIONS, type BullmqJobQueueOptions } from './bullmq-job-queue.js';
import { JobQueue } from './job-queue.js';
import { JobsModule } from './jobs.module.js';

function providerOf(module: DynamicModule, token: unknown): Provider | undefined {
  for (const provider of module.providers ?? []) if (typeof provider === 'object' && 'provide' in provider && provider.provide === token) return provider;
  for (const imported of module.imports ?? []) {
    const found = typeof imported === 'object' && 'module' in imported ? providerOf(imported, token) : undefined;
    if (found) return found;
  }
  return undefined;
}

describe('the job queue at shutdown', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('lets a running job finish for the upstream deadline and a margin before aborting it (inline)', async () => {
    const config = loadConfig({ UPSTREAM_DEADLINE_MS: '60000' });
    const provider = providerOf(JobsModule.forRoot(config), JobQueue) as FactoryProvider<JobQueue>;
    const queue = (provider.useFactory as () => JobQueue)();
    let aborted = false;
    queue.start({
      run: (_id, signal) =>
        new Promise<void>((resolve) => {
          signal.addEventListener('abort', () => {
            aborted = true;
            resolve();
          });
        }),
      abandon: () => Promise.resolve(),
    });
    vi.useFakeTimers();
    await queue.submit('00000000-0000-4000-8000-000000000001');
    const stopped = queue.stop();
    // Past the old hard-coded 10 s, and past the deadline itself: the try may still be writing its outcome.
    await vi.advanceTimersByTimeAsync(60_000);
    expect(aborted).toBe(false);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(aborted).toBe(true);
    await stopped;
  });

  it('gives the bullmq worker the same grace', () => {
    const config = loadConfig({ REDIS_URL: 'redis://127.0.0.1:6379', UPSTREAM_DEADLINE_MS: '120000' });
    const provider = providerOf(JobsModule.forRoot(config), BULLMQ_JOB_QUEUE_OPTIONS) as ValueProvider<BullmqJobQueueOptions>;
    expect(provider.useValue.shutdownGraceMs).toBe(130_000);
  });
});
