import { Controller, Get, Query } from '@nestjs/common';
import { ApiOperation, ApiQuery, ApiTags } from '@nestjs/swagger';
import { parseSpendWindow } from '../budget/spend-query.js';
import { KnownQuery } from '../core/known-query.js';
import { SpendService } from '../budget/spend.service.js';
import { Authenticated, CurrentPrincipal } from '../identity/auth.guard.js';
import type { Principal } from '../identity/principal.js';

/** The caller's own budgets and spend; attributed from the key, like everything else. */
@ApiTags('v1')
@Authenticated()
@Controller('v1')
export class UsageController {
  constructor(private readonly spend: SpendService) {}

  @Get('usage')
  @KnownQuery('from', 'to')
  @ApiOperation({ summary: "The caller's user and department budgets, and the user's spend per model" })
  @ApiQuery({ name: 'from', required: false, description: 'ISO-8601, inclusive (default: start of the current budget period, else of this UTC month)' })
  @ApiQuery({ name: 'to', required: false, description: 'ISO-8601, exclusive' })
  usage(@CurrentPrincipal() principal: Principal, @Query('from') from?: string, @Query('to') to?: string) {
    return this.spend.usage(principal, parseSpendWindow(from, to));
  }
}
