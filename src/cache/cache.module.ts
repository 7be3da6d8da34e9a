import { type DynamicModule, Global, Module, type OnModuleInit, type Provider } from '@nestjs/common';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { AppLogger } from '../core/logger.js';
import { ReadinessRegistry } from '../health/readiness.js';
import { IdentityModule } from '../identity/identity.module.js';
import { RedisConnections } from '../redis/redis-connections.js';
import { RedisModule } from '../redis/redis.module.js';
import { CacheAdminController } from './admin/cache-admin.controller.js';
import { CompletionCache } from './completion-cache.service.js';
import { MemoryResponseCache } from './memory-response-cache.js';
import { nearOptions, RedisResponseCache } from './redis-response-cache.js';
import { ResponseCache } from './response-cache.js';

class CacheReadiness implements OnModuleInit {
  constructor(
    private readonly cache: ResponseCache,
    private readonly readiness: ReadinessRegistry,
  ) {}
  onModuleInit(): void {
    this.readiness.register('cache', () => Promise.resolve(this.cache.describe()));
  }
}

/**
 * The response cache, its driver picked from config when the module graph is built. Global so
 * the pipeline (CompletionModule) can inject CompletionCache without knowing the driver.
 */
@Global()
@Module({})
export class CacheModule {
  static forRoot(config: AppConfig): DynamicModule {
    const driver: string = config.cache.driver;
    let store: Provider;
    const imports: Array<typeof IdentityModule | typeof RedisModule> = [IdentityModule];
    switch (driver) {
      case 'memory':
        store = {
          provide: ResponseCache,
          useFactory: (clock: Clock) => new MemoryResponseCache(clock, config.cache.maxEntries, config.cache.maxBytes),
          inject: [Clock],
        };
        break;
      case 'redis':
        imports.push(RedisModule);
        store = {
          provide: ResponseCache,
          useFactory: (redis: RedisConnections, logger: AppLogger, clock: Clock) => {
            const cache = new RedisResponseCache(redis.shared(), redis.keyPrefix, logger.logger.child({ context: 'Cache' }), nearOptions(clock, config.cache));
            cache.listenWith(redis.subscriber(cache.landedChannel, (key) => cache.landed(key), 'cache-landed'));
            return cache;
          },
          inject: [RedisConnections, AppLogger, Clock],
        };
        break;
      default:
        // Never a silent fallback to another driver (ARCHITECTURE.md).
        throw new Error(`Unknown cache driver '${driver}': expected memory or redis`);
    }
    return {
      module: CacheModule,
      imports,
      controllers: [CacheAdminController],
      providers: [
        store,
        CompletionCache,
        {
          provide: CacheReadiness,
          useFactory: (cache: ResponseCache, readiness: ReadinessRegistry) => new CacheReadiness(cache, readiness),
          inject: [ResponseCache, ReadinessRegistry],
        },
      ],
      exports: [ResponseCache, CompletionCache],
    };
  }
}
