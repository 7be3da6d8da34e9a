import { Controller, Get } from '@nestjs/common';
import { ApiOperation, ApiTags } from '@nestjs/swagger';
import { Authenticated, CurrentPrincipal } from '../identity/auth.guard.js';
import type { Principal } from '../identity/principal.js';
import { RoutingService } from '../routing/routing.service.js';

@ApiTags('v1')
@Authenticated()
@Controller('v1')
export class ModelsController {
  constructor(private readonly routing: RoutingService) {}

  /**
   * What the caller may use: `auto` (every task type), and the models it may name. When the table
   * restricts the models callers may name (`allowed_models`), only those are listed: the rules'
   * other models still answer through `auto`, and `task_types` says which. Each task type shows
   * the chain the caller's department gets (its override, when it has one).
   */
  @Get('models')
  @ApiOperation({ summary: 'Models and task types the caller may use (OpenAI list format)' })
  models(@CurrentPrincipal() principal: Principal) {
    const table = this.routing.table();
    const chains = table.rules.map((rule) => {
      const route = this.routing.resolve({ taskType: rule.task_type, departmentId: principal.departmentId });
      return { taskType: rule.task_type, model: route.models[0] ?? rule.model, fallbacks: route.models.slice(1) };
    });
    const allowed = table.allowed_models ? new Set(table.allowed_models) : null;
    const byModel = new Map<string, string[]>();
    const add = (model: string, taskType?: string) => {
      if (allowed && !allowed.has(model)) return;
      const list = byModel.get(model) ?? [];
      if (taskType && !list.includes(taskType)) list.push(taskType);
      byModel.set(model, list);
    };
    for (const chain of chains) {
      add(chain.model, chain.taskType);
      for (const fallback of chain.fallbacks) add(fallback);
    }
    for (const model of table.allowed_models ?? []) add(model);
    return {
      object: 'list',
      data: [
        { id: 'auto', object: 'model', created: 0, owned_by: 'gatehouse', task_types: table.rules.map((r) => r.task_type) },
        ...[...byModel].map(([id, taskTypes]) => ({ id, object: 'model', created: 0, owned_by: id.split('/')[0] ?? 'unknown', task_types: taskTypes })),
      ],
      task_types: chains.map((c) => ({ task_type: c.taskType, model: c.model, fallbacks: c.fallbacks, default: c.taskType === table.default_task_type })),
      routing_version: table.version,
    };
  }
}
