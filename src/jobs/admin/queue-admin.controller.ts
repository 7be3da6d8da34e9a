import { Controller, Delete, Get, HttpCode, Param, Post, Query, Res } from '@nestjs/common';
import { ApiAcceptedResponse, ApiOkResponse, ApiOperation, ApiQuery, ApiTags } from '@nestjs/swagger';
import type { FastifyReply } from 'fastify';
import { KnownQuery } from '../../core/known-query.js';
import { isUuid, pathUuid } from '../../core/validate.js';
import { GatewayError } from '../../core/errors.js';
import { AdminOnly } from '../../identity/auth.guard.js';
import { adminJobView } from '../job.types.js';
import { JobsService } from '../jobs.service.js';
import { AdminJobDto, DeadJobListDto, DeletedDeadJobDto, parseLimit, QueueStatsDto } from './queue-admin.dto.js';

@ApiTags('admin: queue')
@AdminOnly()
@Controller('admin/queue')
export class QueueAdminController {
  constructor(private readonly jobs: JobsService) {}

  @Get()
  @ApiOperation({ summary: 'Jobs by state (queued, running, completed, failed, dead_lettered) and what the queue holds now' })
  @ApiOkResponse({ type: QueueStatsDto })
  stats() {
    return this.jobs.stats();
  }

  @Get('dead')
  @KnownQuery('limit', 'before')
  @ApiOperation({ summary: 'The dead-letter queue: jobs that failed their last try, newest first' })
  @ApiQuery({ name: 'limit', required: false, description: '1-500, default 50' })
  @ApiQuery({ name: 'before', required: false, description: 'id of the last job of the previous page (also after it was retried or discarded)' })
  @ApiOkResponse({ type: DeadJobListDto })
  async dead(@Query('limit') limit?: string, @Query('before') before?: string) {
    if (before !== undefined && before !== '' && !isUuid(before)) throw new GatewayError('invalid_value', "'before' must be a job id.", { param: 'before' });
    const page = await this.jobs.listDead(parseLimit(limit), before || undefined);
    return { object: 'list', data: page.jobs.map(adminJobView), has_more: page.hasMore };
  }

  @Post('dead/:id/retry')
  @HttpCode(202)
  @ApiOperation({ summary: 'Queue a dead-lettered job again, with a fresh set of tries (it runs as its submitter, key re-checked)' })
  @ApiAcceptedResponse({ type: AdminJobDto })
  async retry(@Param('id') id: string, @Res({ passthrough: true }) reply: FastifyReply) {
    const job = await this.jobs.retryDead(pathUuid(id, 'dead-lettered job'));
    void reply.header('location', `/v1/jobs/${job.id}`);
    return adminJobView(job);
  }

  @Delete('dead/:id')
  @ApiOperation({ summary: 'Remove a job from the dead-letter queue; it stays readable by its submitter, as failed' })
  @ApiOkResponse({ type: DeletedDeadJobDto })
  async discard(@Param('id') id: string) {
    const jobId = pathUuid(id, 'dead-lettered job');
    await this.jobs.discardDead(jobId);
    return { id: jobId, object: 'gateway.job', deleted: true };
  }
}
