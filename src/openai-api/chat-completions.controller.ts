import { Body, Controller, Headers, HttpCode, Post, Req, Res } from '@nestjs/common';
import { ApiBody, ApiHeader, ApiOperation, ApiTags } from '@nestjs/swagger';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { CompletionService } from '../completion/completion.service.js';
import { wantsAsync } from '../core/prefer.js';
import { IdempotencyService } from '../idempotency/idempotency.service.js';
import { Authenticated, DeferredAdmission, SpendsTokens } from '../identity/auth.guard.js';
import { JobsService } from '../jobs/jobs.service.js';
import { refuseCallbackWithoutAsync, submitAsync } from './async-submit.js';
import { parseChatRequest, parseTaskType } from './chat-request.js';
import { ChatCompletionRequestDto } from './openai-api.dto.js';
import { admitted, answerIdempotently, callFromRequest, hasIdempotencyKey, metaHeaders, ReplyStreamSink, sendJsonOnce, streamOnce } from './http-call.js';

@ApiTags('v1')
@Authenticated()
@Controller('v1/chat')
export class ChatCompletionsController {
  constructor(
    private readonly completions: CompletionService,
    private readonly jobs: JobsService,
    private readonly idempotency: IdempotencyService,
  ) {}

  @Post('completions')
  @HttpCode(200)
  @ApiOperation({ summary: 'OpenAI Chat Completions (JSON or SSE), routed, cached and budgeted' })
  @ApiBody({ type: ChatCompletionRequestDto })
  @ApiHeader({ name: 'x-task-type', required: false, description: 'routing table key; same as body task_type' })
  @ApiHeader({ name: 'prefer', required: false, description: "'respond-async': answer 202 with a job to poll at /v1/jobs/{id} (not with stream: true)" })
  @ApiHeader({
    name: 'idempotency-key',
    required: false,
    description: 'a repeat within 24 h gets the stored answer, free (a stream is replayed as one); 409 while the first still runs; another body → 422. With respond-async: the same job',
  })
  @DeferredAdmission()
  @SpendsTokens()
  create(@Req() request: FastifyRequest, @Res() reply: FastifyReply, @Body() raw: unknown, @Headers('x-task-type') taskHeader?: string): Promise<void> {
    return admitted(request, () => this.handle(request, reply, raw, taskHeader));
  }

  private async handle(request: FastifyRequest, reply: FastifyReply, raw: unknown, taskHeader: string | undefined): Promise<void> {
    const body = parseChatRequest(raw);
    const taskType = body.task_type !== undefined ? (body.task_type as string) : taskHeader !== undefined ? parseTaskType(taskHeader, 'x-task-type') : undefined;
    const call = callFromRequest(request, reply, body, taskType, 'chat');
    // prefer: respond-async → 202 and a job; the job later runs this same pipeline.
    if (wantsAsync(request)) return submitAsync(this.jobs, request, reply, call, 'chat', raw);
    refuseCallbackWithoutAsync(raw);
    if (hasIdempotencyKey(request)) {
      return answerIdempotently(this.idempotency, request, reply, call, 'chat', raw, async (claim) => {
        if (body.stream === true) return streamOnce(claim, reply, (sink) => this.completions.stream(call, sink));
        const outcome = await this.completions.complete(call);
        return sendJsonOnce(claim, reply, outcome.meta, outcome.costNanos, outcome.raw);
      });
    }
    if (body.stream === true) {
      await this.completions.stream(call, new ReplyStreamSink(reply));
      return;
    }
    const outcome = await this.completions.complete(call);
    await reply.status(200).headers(metaHeaders(outcome.meta, outcome.costNanos)).header('content-type', 'application/json; charset=utf-8').send(outcome.raw);
  }
}
