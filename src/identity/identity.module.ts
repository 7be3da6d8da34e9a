import { Module } from '@nestjs/common';
import { IdentityAdminController } from './admin/identity-admin.controller.js';
import { AdminGuard, ApiKeyGuard } from './auth.guard.js';
import { IdentityBootstrapService } from './identity-bootstrap.service.js';
import { IdentityService } from './identity.service.js';
import { ApiKeyEntity, DepartmentEntity, UserEntity } from './identity.entities.js';
import { Identity1764400000000 } from './migrations/1764400000000-identity.js';
import { BootstrapKeys1764400000100 } from './migrations/1764400000100-bootstrap-keys.js';
import { UserNames1764400000200 } from './migrations/1764400000200-user-names.js';

export const IDENTITY_ENTITIES = [DepartmentEntity, UserEntity, ApiKeyEntity];
export const IDENTITY_MIGRATIONS = [Identity1764400000000, BootstrapKeys1764400000100, UserNames1764400000200];

@Module({
  controllers: [IdentityAdminController],
  providers: [IdentityService, IdentityBootstrapService, ApiKeyGuard, AdminGuard],
  exports: [IdentityService, IdentityBootstrapService, ApiKeyGuard, AdminGuard],
})
export class IdentityModule {}
