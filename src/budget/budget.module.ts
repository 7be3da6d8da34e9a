import { Module } from '@nestjs/common';
import { IdentityModule } from '../identity/identity.module.js';
import { PricingModule } from '../upstream/pricing/pricing.module.js';
import { BudgetAdminController } from './admin/budget-admin.controller.js';
import { BudgetDatabase } from './budget-database.js';
import { BudgetSettingsService } from './budget-settings.service.js';
import { BudgetSweeper } from './budget-sweeper.service.js';
import { BudgetWriter } from './budget-writer.js';
import { BudgetService } from './budget.service.js';
import { Budget1764400002000 } from './migrations/1764400002000-budget.js';
import { LedgerChargeId1764400002100 } from './migrations/1764400002100-ledger-charge-id.js';
import { ReserveBatch1764400002200 } from './migrations/1764400002200-reserve-batch.js';
import { LedgerCacheHits1764400002300 } from './migrations/1764400002300-ledger-cache-hits.js';
import { ReserveRecordsEveryHold1764400002400 } from './migrations/1764400002400-reserve-records-every-hold.js';
import { LeaseGiveBackOnce1764400002500 } from './migrations/1764400002500-lease-give-back-once.js';
import { SpendService } from './spend.service.js';

export const BUDGET_MIGRATIONS = [
  Budget1764400002000,
  LedgerChargeId1764400002100,
  ReserveBatch1764400002200,
  LedgerCacheHits1764400002300,
  ReserveRecordsEveryHold1764400002400,
  LeaseGiveBackOnce1764400002500,
];

@Module({
  imports: [IdentityModule, PricingModule],
  controllers: [BudgetAdminController],
  providers: [BudgetDatabase, BudgetWriter, BudgetService, BudgetSettingsService, SpendService, BudgetSweeper],
  exports: [BudgetService, BudgetSettingsService, SpendService, BudgetSweeper],
})
export class BudgetModule {}
