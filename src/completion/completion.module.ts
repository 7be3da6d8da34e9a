import { Module } from '@nestjs/common';
import { BudgetModule } from '../budget/budget.module.js';
import { RoutingModule } from '../routing/routing.module.js';
import { PricingModule } from '../upstream/pricing/pricing.module.js';
import { CompletionService } from './completion.service.js';
import { UpstreamCaller } from './upstream-caller.js';

@Module({
  imports: [RoutingModule, BudgetModule, PricingModule],
  providers: [CompletionService, UpstreamCaller],
  exports: [CompletionService],
})
export class CompletionModule {}
