import { Module } from '@nestjs/common';
import { IdentityModule } from '../identity/identity.module.js';
import { RoutingAdminController } from './admin/routing-admin.controller.js';
import { Routing1764400001000 } from './migrations/1764400001000-routing.js';
import { RoutingService } from './routing.service.js';

export const ROUTING_MIGRATIONS = [Routing1764400001000];

@Module({
  imports: [IdentityModule],
  controllers: [RoutingAdminController],
  providers: [RoutingService],
  exports: [RoutingService],
})
export class RoutingModule {}
