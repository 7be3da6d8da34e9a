import { Controller, Delete, HttpCode, Query } from '@nestjs/common';
import { ApiOkResponse, ApiOperation, ApiProperty, ApiPropertyOptional, ApiQuery, ApiTags } from '@nestjs/swagger';
import { GatewayError } from '../../core/errors.js';
import { isUuid, rejectUnknownQuery } from '../../core/validate.js';
import { AdminOnly } from '../../identity/auth.guard.js';
import { CompletionCache } from '../completion-cache.service.js';
import type { CacheFilter } from '../response-cache.js';

const FILTERS: readonly string[] = ['model', 'user_id', 'department_id'];

export class CacheInvalidationDto {
  @ApiProperty({ example: 'cache.invalidation' }) object!: 'cache.invalidation';
  @ApiProperty({ description: 'entries deleted' }) deleted!: number;
  @ApiPropertyOptional() model?: string;
  @ApiPropertyOptional({ format: 'uuid' }) user_id?: string;
  @ApiPropertyOptional({ format: 'uuid' }) department_id?: string;

  /**
   * Query parameters → filter; several parameters narrow together (AND). Any other parameter is
   * a 400: no filter means "delete everything", so a misspelt one (`?userid=`) must not mean that.
   */
  static parse(query: Record<string, unknown>): CacheFilter {
    rejectUnknownQuery(query, FILTERS, `filter by ${FILTERS.map((f) => `'${f}'`).join(', ')}, or none to delete every entry`);
    const filter: CacheFilter = {};
    const model = single(query.model, 'model');
    if (model !== undefined) {
      if (model.length === 0 || model.length > 200) throw new GatewayError('invalid_value', "'model' must be a model id.", { param: 'model' });
      filter.model = model;
    }
    const userId = single(query.user_id, 'user_id');
    if (userId !== undefined) filter.userId = uuid(userId, 'user_id');
    const departmentId = single(query.department_id, 'department_id');
    if (departmentId !== undefined) filter.departmentId = uuid(departmentId, 'department_id');
    return filter;
  }
}

function single(value: unknown, param: string): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string') throw new GatewayError('invalid_value', `'${param}' may be given once.`, { param });
  return value;
}

function uuid(value: string, param: string): string {
  if (!isUuid(value)) throw new GatewayError('invalid_value', `Invalid '${param}': expected a UUID.`, { param });
  return value.toLowerCase();
}

@ApiTags('admin: cache')
@AdminOnly()
@Controller('admin/cache')
export class CacheAdminController {
  constructor(private readonly cache: CompletionCache) {}

  @Delete()
  @HttpCode(200)
  @ApiOperation({ summary: 'Delete cached answers: all, or those of a model, a user, a department (combinable)' })
  @ApiQuery({ name: 'model', required: false })
  @ApiQuery({ name: 'user_id', required: false })
  @ApiQuery({ name: 'department_id', required: false })
  @ApiOkResponse({ type: CacheInvalidationDto })
  async invalidate(@Query() query: Record<string, unknown>): Promise<CacheInvalidationDto> {
    const filter = CacheInvalidationDto.parse(query);
    const deleted = await this.cache.invalidate(filter);
    return {
      object: 'cache.invalidation',
      deleted,
      ...(filter.model !== undefined ? { model: filter.model } : {}),
      ...(filter.userId !== undefined ? { user_id: filter.userId } : {}),
      ...(filter.departmentId !== undefined ? { department_id: filter.departmentId } : {}),
    };
  }
}
