import { type DynamicModule, Module } from '@nestjs/common';
import type { Logger } from 'pino';
import { AUDIT_MIGRATIONS, AuditModule } from './audit/audit.module.js';
import { BUDGET_MIGRATIONS, BudgetModule } from './budget/budget.module.js';
import { CacheModule } from './cache/cache.module.js';
import { CompletionModule } from './completion/completion.module.js';
import { type AppConfig } from './config/config.js';
import { ConfigModule } from './config/config.module.js';
import { type Clock, SystemClock } from './core/clock.js';
import { CoreModule } from './core/core.module.js';
import type { DatabaseContent, OpenedDatabase } from './database/data-source.js';
import { DatabaseModule } from './database/database.module.js';
import { HealthModule } from './health/health.module.js';
import { IDEMPOTENCY_MIGRATIONS } from './idempotency/idempotency.module.js';
import { IDENTITY_ENTITIES, IDENTITY_MIGRATIONS, IdentityModule } from './identity/identity.module.js';
import { JOBS_MIGRATIONS, JobsModule } from './jobs/jobs.module.js';
import { LifecycleModule } from './lifecycle/lifecycle.module.js';
import { MetricsModule } from './metrics/metrics.module.js';
import { OpenAiApiModule } from './openai-api/openai-api.module.js';
import { RATE_LIMIT_MIGRATIONS, RateLimitModule } from './rate-limit/rate-limit.module.js';
import { ROUTING_MIGRATIONS, RoutingModule } from './routing/routing.module.js';
import { PRICING_MIGRATIONS, PricingModule } from './upstream/pricing/pricing.module.js';
import { UpstreamModule } from './upstream/upstream.module.js';

/** Every feature's tables; app.module is the one place that knows all features. */
export const DATABASE_CONTENT: DatabaseContent = {
  entities: [...IDENTITY_ENTITIES],
  migrations: [...IDENTITY_MIGRATIONS, ...ROUTING_MIGRATIONS, ...BUDGET_MIGRATIONS, ...PRICING_MIGRATIONS, ...RATE_LIMIT_MIGRATIONS, ...AUDIT_MIGRATIONS, ...JOBS_MIGRATIONS, ...IDEMPOTENCY_MIGRATIONS],
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
        // Global: the pipeline records into GatewayMetrics and runs streams under the drain's deadline.
        MetricsModule,
        LifecycleModule,
        // After DatabaseModule: its final flush on shutdown must run before the database closes.
        AuditModule,
        IdentityModule,
        RoutingModule,
        PricingModule,
        BudgetModule,
        // Memory or Redis (REDIS_URL) drivers, chosen here from config; no connection in memory mode.
        CacheModule.forRoot(config),
        RateLimitModule.forRoot(config),
        CompletionModule,
        // Inline or BullMQ (REDIS_URL) queue; processes in roles worker and all, submits only in api.
        JobsModule.forRoot(config),
        OpenAiApiModule,
      ],
    };
  }
}
