import { Controller, Get, Param, Res } from '@nestjs/common';
import { ApiOkResponse, ApiOperation, ApiTags } from '@nestjs/swagger';
import type { FastifyReply } from 'fastify';
import { pathUuid } from '../core/validate.js';
import { Authenticated, CurrentPrincipal } from '../identity/auth.guard.js';
import type { Principal } from '../identity/principal.js';
import { JobDto } from '../jobs/admin/queue-admin.dto.js';
import { jobView } from '../jobs/job.types.js';
import { JobsService } from '../jobs/jobs.service.js';

/** Where a `prefer: respond-async` submit says to poll. */
@ApiTags('v1')
@Authenticated()
@Controller('v1/jobs')
export class JobsController {
  constructor(private readonly jobs: JobsService) {}

  @Get(':id')
  @ApiOperation({
    summary: 'An async job: status, result (the chat completion) or error, attempts. Only its submitter or an admin may read it; others get 404.',
  })
  @ApiOkResponse({ type: JobDto })
  async get(@CurrentPrincipal() principal: Principal, @Param('id') id: string, @Res({ passthrough: true }) reply: FastifyReply) {
    const job = await this.jobs.get(pathUuid(id, 'job'), principal);
    // Polls count against rate limits like any /v1 call: tell pollers a sensible pace.
    if (job.status === 'queued' || job.status === 'running') void reply.header('retry-after', '1');
    return jobView(job);
  }
}
