import { type DynamicModule, Module } from '@nestjs/common';
import type { Logger } from 'pino';
import { CompletionModule } from './completion/completion.module.js';
import { type AppConfig } from './config/config.js';
import { ConfigModule } from './config/config.module.js';
import { type Clock, SystemClock } from './core/clock.js';
import { CoreModule } from './core/core.module.js';
import type { DatabaseContent, OpenedDatabase } from './database/data-source.js';
import { DatabaseModule } from './database/database.module.js';
import { HealthModule } from './health/health.module.js';
import { IDENTITY_ENTITIES, IDENTITY_MIGRATIONS, IdentityModule } from './identity/identity.module.js';
import { OpenAiApiModule } from './openai-api/openai-api.module.js';
import { ROUTING_MIGRATIONS, RoutingModule } from './routing/routing.module.js';
import { UpstreamModule } from './upstream/upstream.module.js';

/** Every feature's tables; app.module is the one place that knows all features. */
export const DATABASE_CONTENT: DatabaseContent = {
  entities: [...IDENTITY_ENTITIES],
  migrations: [...IDENTITY_MIGRATIONS, ...ROUTING_MIGRATIONS],
};

export interface AppModuleOptions {
  config: AppConfig;
  logger: Logger;
  database: OpenedDatabase;
  clock?: Clock;
}

@Module({})
export class AppModule {
  /** Tests build the app with this same call, from a config object instead of the environment. */
  static forRoot(options: AppModuleOptions): DynamicModule {
    const { config } = options;
    return {
      module: AppModule,
      imports: [
        ConfigModule.forRoot(config),
        CoreModule.forRoot(options.logger, options.clock ?? new SystemClock()),
        DatabaseModule.forRoot(options.database),
        UpstreamModule.forRoot(config),
        HealthModule,
        IdentityModule,
        RoutingModule,
        CompletionModule,
        OpenAiApiModule,
      ],
    };
  }
}
