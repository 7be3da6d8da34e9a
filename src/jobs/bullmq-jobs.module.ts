import { BullModule, Processor } from '@nestjs/bullmq';
import { type DynamicModule, Module, type Type } from '@nestjs/common';
import type { WorkerOptions } from 'bullmq';
import type { Redis } from 'ioredis';
import {
  BULLMQ_JOB_QUEUE_OPTIONS,
  BullmqJobQueue,
  type BullmqJobQueueOptions,
  JOBS_PRODUCER_REDIS,
  JOBS_QUEUE_NAME,
  JobsRedisLog,
  JobsWorkerHost,
  openProducerRedis,
  reconnectDelay,
} from './bullmq-job-queue.js';
import { delayFor, JobQueue } from './job-queue.js';

const BACKOFF_TYPE = 'gatehouse';

/** The options, the jobs logger and the producer connection, for BullModule.forRootAsync and the queue. */
@Module({})
class BullmqConnectionModule {}

/**
 * The bullmq driver of the job queue through @nestjs/bullmq: BullModule's root config (the
 * producer connection and the key prefix), the `jobs` queue, and its `@Processor` worker host.
 * JobsModule imports it only when JOBS_DRIVER=bullmq: in inline mode nothing of this exists.
 */
@Module({})
export class BullmqJobsModule {
  static forRoot(options: BullmqJobQueueOptions): DynamicModule {
    const connection: DynamicModule = {
      module: BullmqConnectionModule,
      providers: [
        { provide: BULLMQ_JOB_QUEUE_OPTIONS, useValue: options },
        JobsRedisLog,
        { provide: JOBS_PRODUCER_REDIS, useFactory: openProducerRedis, inject: [BULLMQ_JOB_QUEUE_OPTIONS, JobsRedisLog] },
      ],
      exports: [BULLMQ_JOB_QUEUE_OPTIONS, JobsRedisLog, JOBS_PRODUCER_REDIS],
    };
    return {
      module: BullmqJobsModule,
      imports: [
        connection,
        BullModule.forRootAsync({
          imports: [connection],
          useFactory: (producer: Redis) => ({ connection: producer, prefix: options.prefix }),
          inject: [JOBS_PRODUCER_REDIS],
          // The worker is built in JobQueue.start(), not at module init: never in the api role,
          // and no job arrives before the handler is attached.
          extraOptions: { manualRegistration: true },
        }),
        BullModule.registerQueue({
          name: JOBS_QUEUE_NAME,
          defaultJobOptions: {
            attempts: options.maxTries,
            backoff: { type: BACKOFF_TYPE },
            removeOnComplete: true,
            removeOnFail: true,
          },
        }),
      ],
      providers: [{ provide: JobsWorkerHost, useClass: configuredWorkerHost(options) }, BullmqJobQueue, { provide: JobQueue, useExisting: BullmqJobQueue }],
      exports: [JobQueue],
    };
  }
}

/**
 * @nestjs/bullmq reads worker options only from `@Processor` metadata, which a decorator fixes
 * when the class is defined; ours come from config, so the decorator is applied here, to a
 * subclass made per module.
 */
function configuredWorkerHost(options: BullmqJobQueueOptions): Type<JobsWorkerHost> {
  class ConfiguredJobsWorkerHost extends JobsWorkerHost {}
  Processor(JOBS_QUEUE_NAME, workerOptions(options))(ConfiguredJobsWorkerHost);
  return ConfiguredJobsWorkerHost;
}

function workerOptions(options: BullmqJobQueueOptions): WorkerOptions {
  return {
    concurrency: options.concurrency,
    // Its own connection (BullMQ opens it, plus a blocking one, when the worker is built), with
    // the offline queue on: a worker waits out a Redis restart, only submits must fail fast.
    connection: { url: options.redisUrl, connectionName: 'gatehouse-jobs-worker', retryStrategy: reconnectDelay },
    settings: { backoffStrategy: (attemptsMade: number, _type?: string, error?: Error) => delayFor(error, attemptsMade, options.backoff) },
  };
}
