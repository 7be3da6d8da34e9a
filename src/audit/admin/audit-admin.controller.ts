import { Controller, Get, Query } from '@nestjs/common';
import { ApiOkResponse, ApiOperation, ApiQuery, ApiTags } from '@nestjs/swagger';
import { AdminOnly } from '../../identity/auth.guard.js';
import { AuditService } from '../audit.service.js';
import { AuditListDto, AuditListQueryDto, AuditVerifyDto, AuditVerifyQueryDto, auditEventView } from './audit-admin.dto.js';

@ApiTags('admin: audit')
@AdminOnly()
@Controller('admin/audit')
export class AuditAdminController {
  constructor(private readonly audit: AuditService) {}

  @Get()
  @ApiOperation({ summary: 'Audit events, newest first (admin changes, failed admin attempts, every completion request)' })
  @ApiQuery({ name: 'actor', required: false, description: 'user id, key id or key prefix' })
  @ApiQuery({ name: 'action', required: false, description: 'exact, e.g. `PUT /admin/routing` or `completion`; a trailing `*` matches a prefix' })
  @ApiQuery({ name: 'from', required: false, description: 'ISO-8601, inclusive' })
  @ApiQuery({ name: 'to', required: false, description: 'ISO-8601, exclusive' })
  @ApiQuery({ name: 'cursor', required: false, description: '`next_cursor` of the previous page' })
  @ApiQuery({ name: 'limit', required: false, description: '1-500, default 50' })
  @ApiOkResponse({ type: AuditListDto })
  async list(@Query() query: unknown): Promise<AuditListDto> {
    const { events, nextCursor } = await this.audit.list(AuditListQueryDto.parse(query));
    return { object: 'list', data: events.map(auditEventView), next_cursor: nextCursor };
  }

  @Get('verify')
  @ApiOperation({ summary: 'Recompute the hash chain over a range and report the first event that does not match' })
  @ApiQuery({ name: 'from', required: false, description: 'seq or ISO-8601 date-time; default: the first event' })
  @ApiQuery({ name: 'to', required: false, description: 'seq or ISO-8601 date-time; default: the chain head' })
  @ApiOkResponse({ type: AuditVerifyDto })
  verify(@Query() query: unknown): Promise<AuditVerifyDto> {
    return this.audit.verify(AuditVerifyQueryDto.parse(query));
  }
}
