import { Module } from '@nestjs/common';
import { IdentityModule } from '../identity/identity.module.js';
import { RoutingAdminController } from './admin/routing-admin.controller.js';
import { Routing1764400001000 } from './migrations/1764400001000-routing.js';
import { RoutingHistory1764400001100 } from './migrations/1764400001100-routing-history.js';
import { RoutingVersionsRepository } from './routing-versions.repository.js';
import { RoutingService } from './routing.service.js';

export const ROUTING_MIGRATIONS = [Routing1764400001000, RoutingHistory1764400001100];

@Module({
  imports: [IdentityModule],
  controllers: [RoutingAdminController],
  providers: [RoutingService, RoutingVersionsRepository],
  exports: [RoutingService],
})
export class RoutingModule {}
