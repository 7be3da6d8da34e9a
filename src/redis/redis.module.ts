import { Module } from '@nestjs/common';
import { RedisConnections } from './redis-connections.js';

/**
 * Imported only by the Redis drivers' modules (CacheModule / RateLimitModule in redis mode), so
 * a memory-mode gateway never constructs RedisConnections and never opens a connection. Nest
 * builds a static module once however many modules import it: one shared connection.
 */
@Module({
  providers: [RedisConnections],
  exports: [RedisConnections],
})
export class RedisModule {}
