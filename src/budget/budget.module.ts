import { Module } from '@nestjs/common';
import { IdentityModule } from '../identity/identity.module.js';
import { PricingModule } from '../upstream/pricing/pricing.module.js';
import { BudgetAdminController } from './admin/budget-admin.controller.js';
import { BudgetSettingsService } from './budget-settings.service.js';
import { BudgetSweeper } from './budget-sweeper.service.js';
import { BudgetService } from './budget.service.js';
import { Budget1764400002000 } from './migrations/1764400002000-budget.js';
import { SpendService } from './spend.service.js';

export const BUDGET_MIGRATIONS = [Budget1764400002000];

@Module({
  imports: [IdentityModule, PricingModule],
  controllers: [BudgetAdminController],
  providers: [BudgetService, BudgetSettingsService, SpendService, BudgetSweeper],
  exports: [BudgetService, BudgetSettingsService, SpendService, BudgetSweeper],
})
export class BudgetModule {}
