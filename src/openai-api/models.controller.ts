import { Controller, Get } from '@nestjs/common';
import { ApiOperation, ApiTags } from '@nestjs/swagger';
import { Authenticated } from '../identity/auth.guard.js';
import { RoutingService } from '../routing/routing.service.js';

@ApiTags('v1')
@Authenticated()
@Controller('v1')
export class ModelsController {
  constructor(private readonly routing: RoutingService) {}

  @Get('models')
  @ApiOperation({ summary: 'Models and task types the caller may use (OpenAI list format)' })
  models() {
    const table = this.routing.table();
    const byModel = new Map<string, string[]>();
    const add = (model: string, taskType?: string) => {
      const list = byModel.get(model) ?? [];
      if (taskType && !list.includes(taskType)) list.push(taskType);
      byModel.set(model, list);
    };
    for (const rule of table.rules) {
      add(rule.model, rule.task_type);
      for (const fallback of rule.fallbacks) add(fallback);
    }
    for (const model of table.allowed_models ?? []) add(model);
    return {
      object: 'list',
      data: [
        { id: 'auto', object: 'model', created: 0, owned_by: 'gatehouse', task_types: table.rules.map((r) => r.task_type) },
        ...[...byModel].map(([id, taskTypes]) => ({ id, object: 'model', created: 0, owned_by: id.split('/')[0] ?? 'unknown', task_types: taskTypes })),
      ],
      task_types: table.rules.map((r) => ({ task_type: r.task_type, model: r.model, fallbacks: r.fallbacks, default: r.task_type === table.default_task_type })),
      routing_version: table.version,
    };
  }
}
