import { Body, Controller, Delete, Get, HttpCode, Param, Put, Query } from '@nestjs/common';
import { ApiBody, ApiOkResponse, ApiOperation, ApiQuery, ApiTags } from '@nestjs/swagger';
import { KnownQuery } from '../../core/known-query.js';
import { pathUuid } from '../../core/validate.js';
import { AdminOnly } from '../../identity/auth.guard.js';
import { BudgetSettingsService } from '../budget-settings.service.js';
import type { BudgetScope } from '../budget.types.js';
import { SpendService } from '../spend.service.js';
import { parseSpendGroup, parseSpendWindow } from '../spend-query.js';
import { BudgetViewDto, budgetViewJson, PutBudgetDto } from './budget-admin.dto.js';

// URL segment → scope; the segment names are API.md's.
const SEGMENTS: Record<'users' | 'departments', BudgetScope> = { users: 'user', departments: 'department' };

@ApiTags('admin: budgets')
@AdminOnly()
@Controller('admin')
export class BudgetAdminController {
  constructor(
    private readonly budgets: BudgetSettingsService,
    private readonly spend: SpendService,
  ) {}

  @Put('budgets/users/:id')
  @ApiOperation({ summary: "Set a user's budget (limit per UTC period)" })
  @ApiBody({ type: PutBudgetDto })
  @ApiOkResponse({ type: BudgetViewDto })
  setUser(@Param('id') id: string, @Body() body: unknown) {
    return this.set('users', id, body);
  }

  @Put('budgets/departments/:id')
  @ApiOperation({ summary: "Set a department's budget (limit per UTC period)" })
  @ApiBody({ type: PutBudgetDto })
  @ApiOkResponse({ type: BudgetViewDto })
  setDepartment(@Param('id') id: string, @Body() body: unknown) {
    return this.set('departments', id, body);
  }

  @Get('budgets/users/:id')
  @ApiOkResponse({ type: BudgetViewDto })
  getUser(@Param('id') id: string) {
    return this.get('users', id);
  }

  @Get('budgets/departments/:id')
  @ApiOkResponse({ type: BudgetViewDto })
  getDepartment(@Param('id') id: string) {
    return this.get('departments', id);
  }

  @Delete('budgets/users/:id')
  @HttpCode(200)
  @ApiOperation({ summary: "Remove a user's budget (unlimited again; the ledger stays)" })
  removeUser(@Param('id') id: string) {
    return this.remove('users', id);
  }

  @Delete('budgets/departments/:id')
  @HttpCode(200)
  @ApiOperation({ summary: "Remove a department's budget (unlimited again; the ledger stays)" })
  removeDepartment(@Param('id') id: string) {
    return this.remove('departments', id);
  }

  @Get('spend')
  @KnownQuery('group_by', 'from', 'to')
  @ApiOperation({ summary: 'Spend from the ledger, grouped by user, department or model (default window: this UTC month)' })
  @ApiQuery({ name: 'group_by', enum: ['user', 'department', 'model'], required: false })
  @ApiQuery({ name: 'from', required: false, description: 'ISO-8601, inclusive' })
  @ApiQuery({ name: 'to', required: false, description: 'ISO-8601, exclusive' })
  report(@Query('group_by') groupBy?: string, @Query('from') from?: string, @Query('to') to?: string) {
    return this.spend.report(parseSpendGroup(groupBy), parseSpendWindow(from, to));
  }

  private async set(segment: keyof typeof SEGMENTS, id: string, body: unknown): Promise<BudgetViewDto> {
    const scope = SEGMENTS[segment];
    const uuid = pathUuid(id, scope);
    const dto = PutBudgetDto.parse(body);
    return budgetViewJson(scope, uuid, await this.budgets.set(scope, uuid, dto.limitNanos, dto.period));
  }

  private async get(segment: keyof typeof SEGMENTS, id: string): Promise<BudgetViewDto> {
    const scope = SEGMENTS[segment];
    const uuid = pathUuid(id, scope);
    return budgetViewJson(scope, uuid, await this.budgets.get(scope, uuid));
  }

  private async remove(segment: keyof typeof SEGMENTS, id: string): Promise<BudgetViewDto> {
    const scope = SEGMENTS[segment];
    const uuid = pathUuid(id, scope);
    await this.budgets.remove(scope, uuid);
    return budgetViewJson(scope, uuid, null);
  }
}
