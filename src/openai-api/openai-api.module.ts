import { Module } from '@nestjs/common';
import { CompletionModule } from '../completion/completion.module.js';
import { IdentityModule } from '../identity/identity.module.js';
import { RoutingModule } from '../routing/routing.module.js';
import { ChatCompletionsController } from './chat-completions.controller.js';
import { CompleteController } from './complete.controller.js';
import { ModelsController } from './models.controller.js';

@Module({
  imports: [CompletionModule, IdentityModule, RoutingModule],
  controllers: [ChatCompletionsController, CompleteController, ModelsController],
})
export class OpenAiApiModule {}
