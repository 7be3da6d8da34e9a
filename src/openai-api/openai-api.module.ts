import { Module } from '@nestjs/common';
import { BudgetModule } from '../budget/budget.module.js';
import { CompletionModule } from '../completion/completion.module.js';
import { IdempotencyModule } from '../idempotency/idempotency.module.js';
import { IdentityModule } from '../identity/identity.module.js';
import { RoutingModule } from '../routing/routing.module.js';
import { ChatCompletionsController } from './chat-completions.controller.js';
import { CompleteController } from './complete.controller.js';
import { JobsController } from './jobs.controller.js';
import { ModelsController } from './models.controller.js';
import { UsageController } from './usage.controller.js';

@Module({
  imports: [CompletionModule, IdentityModule, RoutingModule, BudgetModule, IdempotencyModule],
  controllers: [ChatCompletionsController, CompleteController, ModelsController, UsageController, JobsController],
})
export class OpenAiApiModule {}
