import { type DynamicModule, Global, Module, type OnModuleInit } from '@nestjs/common';
import { ThrottlerModule } from '@nestjs/throttler';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { AdmissionGuard } from '../identity/auth.guard.js';
import { IdentityModule } from '../identity/identity.module.js';
import { RedisConnections } from '../redis/redis-connections.js';
import { RedisModule } from '../redis/redis.module.js';
import { RateLimitAdminController } from './admin/rate-limit-admin.controller.js';
import { MemoryRateLimitStore } from './memory-rate-limit.store.js';
import { RateLimits1764400003000 } from './migrations/1764400003000-rate-limits.js';
import { RateLimitOverrides } from './rate-limit-overrides.service.js';
import { RateLimitGuard } from './rate-limit.guard.js';
import { RateLimitStore } from './rate-limit.store.js';
import { RateLimiter, WINDOW_MS } from './rate-limiter.service.js';
import { RedisRateLimitStore } from './redis-rate-limit.store.js';

export const RATE_LIMIT_MIGRATIONS = [RateLimits1764400003000];

class RateLimitReadiness implements OnModuleInit {
  constructor(
    private readonly store: RateLimitStore,
    private readonly readiness: ReadinessRegistry,
  ) {}
  onModuleInit(): void {
    this.readiness.register('rate_limit', () => Promise.resolve(this.store.describe()));
  }
}

/** The store alone, so that ThrottlerModule's options factory can inject it as its storage. */
@Module({})
class RateLimitStoreModule {
  static forRoot(config: AppConfig): DynamicModule {
    const driver: string = config.rateLimit.driver;
    switch (driver) {
      case 'memory':
        return {
          module: RateLimitStoreModule,
          providers: [{ provide: RateLimitStore, useFactory: (clock: Clock) => new MemoryRateLimitStore(clock), inject: [Clock] }],
          exports: [RateLimitStore],
        };
      case 'redis':
        return {
          module: RateLimitStoreModule,
          imports: [RedisModule],
          providers: [
            {
              provide: RateLimitStore,
              useFactory: (redis: RedisConnections, clock: Clock, logger: AppLogger) =>
                new RedisRateLimitStore(
                  redis.shared(),
                  redis.keyPrefix,
                  new MemoryRateLimitStore(clock),
                  logger.logger.child({ context: 'RateLimit' }),
                  config.rateLimit.leasePercent > 0 ? { percent: config.rateLimit.leasePercent, clock } : undefined,
                ),
              inject: [RedisConnections, Clock, AppLogger],
            },
          ],
          exports: [RateLimitStore],
        };
      default:
        // Never a silent fallback to another driver (ARCHITECTURE.md).
        throw new Error(`Unknown rate limit driver '${driver}': expected memory or redis`);
    }
  }
}

/**
 * Rate limits per key, user and department (and per admin key on /admin), on `@nestjs/throttler`
 * with our storage. Global: identity's AdmissionStep finds the guard through the AdmissionGuard
 * port, and the pipeline injects RateLimiter to count tokens.
 */
@Global()
@Module({})
export class RateLimitModule {
  static forRoot(config: AppConfig): DynamicModule {
    const storeModule = RateLimitStoreModule.forRoot(config);
    return {
      module: RateLimitModule,
      imports: [
        storeModule,
        IdentityModule,
        ThrottlerModule.forRootAsync({
          imports: [storeModule],
          inject: [RateLimitStore],
          // One nominal throttler: RateLimitGuard computes the real limits per principal.
          useFactory: (storage: RateLimitStore) => ({ throttlers: [{ name: 'requests', ttl: WINDOW_MS, limit: config.rateLimit.keyRpm }], storage }),
        }),
      ],
      controllers: [RateLimitAdminController],
      providers: [
        RateLimitOverrides,
        RateLimiter,
        RateLimitGuard,
        { provide: AdmissionGuard, useExisting: RateLimitGuard },
        {
          provide: RateLimitReadiness,
          useFactory: (store: RateLimitStore, readiness: ReadinessRegistry) => new RateLimitReadiness(store, readiness),
          inject: [RateLimitStore, ReadinessRegistry],
        },
      ],
      exports: [RateLimiter, AdmissionGuard, storeModule],
    };
  }
}
