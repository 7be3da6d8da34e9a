import { type DynamicModule, Global, Module } from '@nestjs/common';
import type { Logger } from 'pino';
import { AppLogger } from './logger.js';
import { Clock, SystemClock } from './clock.js';

@Global()
@Module({})
export class CoreModule {
  static forRoot(logger: Logger, clock: Clock = new SystemClock()): DynamicModule {
    return {
      module: CoreModule,
      providers: [
        { provide: AppLogger, useValue: { logger } satisfies AppLogger },
        { provide: Clock, useValue: clock },
      ],
      exports: [AppLogger, Clock],
    };
  }
}
