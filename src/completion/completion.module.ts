import { Module } from '@nestjs/common';
import { RoutingModule } from '../routing/routing.module.js';
import { CompletionService } from './completion.service.js';

@Module({
  imports: [RoutingModule],
  providers: [CompletionService],
  exports: [CompletionService],
})
export class CompletionModule {}
