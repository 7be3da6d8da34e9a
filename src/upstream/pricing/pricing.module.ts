import { Module } from '@nestjs/common';
import { IdentityModule } from '../../identity/identity.module.js';
import { PricingAdminController } from './admin/pricing-admin.controller.js';
import { PricingOverrides1764400002001 } from './migrations/1764400002001-pricing-overrides.js';
import { PricingService } from './pricing.service.js';

export const PRICING_MIGRATIONS = [PricingOverrides1764400002001];

@Module({
  imports: [IdentityModule],
  controllers: [PricingAdminController],
  providers: [PricingService],
  exports: [PricingService],
})
export class PricingModule {}
