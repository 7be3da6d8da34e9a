import { Global, Module } from '@nestjs/common';
import { AppConfig } from '../config/config.js';
import { IdentityModule } from '../identity/identity.module.js';
import { AuditAdminController } from './admin/audit-admin.controller.js';
import { AuditHttpHook } from './audit-http.hook.js';
import { AuditRepository } from './audit.repository.js';
import { AuditOptions, AuditService } from './audit.service.js';
import { AuditEvents1764400004000 } from './migrations/1764400004000-audit.js';

export const AUDIT_MIGRATIONS = [AuditEvents1764400004000];

const MAX_BACKOFF_MS = 30_000;

/**
 * Global: the pipeline, job workers and any feature record events without importing this module.
 * Import it after DatabaseModule in AppModule: Nest shuts global modules down in reverse order, so
 * the final flush then runs before the database closes.
 */
@Global()
@Module({
  imports: [IdentityModule],
  controllers: [AuditAdminController],
  providers: [
    AuditRepository,
    {
      provide: AuditOptions,
      useFactory: (config: AppConfig): AuditOptions => ({ ...config.audit, maxBackoffMs: Math.max(MAX_BACKOFF_MS, config.audit.flushMs) }),
      inject: [AppConfig],
    },
    AuditService,
    AuditHttpHook,
  ],
  exports: [AuditService],
})
export class AuditModule {}
