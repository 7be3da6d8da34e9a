import { Module } from '@nestjs/common';
import { RoutingModule } from '../routing/routing.module.js';
import { CompletionService } from './completion.service.js';
import { UpstreamCaller } from './upstream-caller.js';

@Module({
  imports: [RoutingModule],
  providers: [CompletionService, UpstreamCaller],
  exports: [CompletionService],
})
export class CompletionModule {}
