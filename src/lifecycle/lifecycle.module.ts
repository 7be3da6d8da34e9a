import { Global, Module } from '@nestjs/common';
import { ShutdownService } from './shutdown.service.js';

/** Graceful shutdown (drain) for every role; the pipeline and gateway.ts's hooks use it. */
@Global()
@Module({
  providers: [ShutdownService],
  exports: [ShutdownService],
})
export class LifecycleModule {}
