import { Body, Controller, HttpCode, Post, Req, Res } from '@nestjs/common';
import { ApiBody, ApiHeader, ApiOkResponse, ApiOperation, ApiTags } from '@nestjs/swagger';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { toUsdNumber } from '../../libs/money/src/index.js';
import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import { CompletionService } from '../completion/completion.service.js';
import { GatewayError } from '../core/errors.js';
import { asBody, optionalNumber, optionalString } from '../core/validate.js';
import { Authenticated, DeferredAdmission } from '../identity/auth.guard.js';
import { JobsService } from '../jobs/jobs.service.js';
import { submitAsync, wantsAsync } from './async-submit.js';
import { parseTaskType } from './chat-request.js';
import { admitted, callFromRequest, metaHeaders } from './http-call.js';
import { CompleteRequestDto, CompleteResponseDto } from './openai-api.dto.js';

const MAX_PROMPT_CHARS = 1_000_000;

/** The seed's simple form: one prompt in, the text and its cost out. Same pipeline as chat. */
@ApiTags('v1')
@Authenticated()
@Controller('v1')
export class CompleteController {
  constructor(
    private readonly completions: CompletionService,
    private readonly jobs: JobsService,
  ) {}

  @Post('complete')
  @HttpCode(200)
  @ApiOperation({ summary: 'Simple completion: prompt → content, model, tokens, cost' })
  @ApiBody({ type: CompleteRequestDto })
  @ApiHeader({ name: 'prefer', required: false, description: "'respond-async': answer 202 with a job to poll at /v1/jobs/{id}" })
  @ApiHeader({ name: 'idempotency-key', required: false, description: 'with respond-async: a retried submit returns the same job; another body → 422' })
  @ApiOkResponse({ type: CompleteResponseDto })
  @DeferredAdmission()
  complete(@Req() request: FastifyRequest, @Res() reply: FastifyReply, @Body() raw: unknown): Promise<void> {
    return admitted(request, () => this.handle(request, reply, raw));
  }

  private async handle(request: FastifyRequest, reply: FastifyReply, raw: unknown): Promise<void> {
    const body = asBody(raw);
    const prompt = body.prompt;
    if (prompt === undefined || prompt === null) throw new GatewayError('missing_field', "Missing required parameter: 'prompt'.", { param: 'prompt' });
    if (typeof prompt !== 'string' || prompt.length === 0 || prompt.length > MAX_PROMPT_CHARS) {
      throw new GatewayError('invalid_value', "'prompt' must be a non-empty string.", { param: 'prompt' });
    }
    const maxTokens = optionalNumber(body, 'max_tokens', { integer: true, min: 1 });
    const model = optionalString(body, 'model');
    const taskType = body.task_type === undefined || body.task_type === null ? undefined : parseTaskType(body.task_type, 'task_type');
    const chat: ChatCompletionRequest = { messages: [{ role: 'user', content: prompt }] };
    if (maxTokens !== undefined) chat.max_tokens = maxTokens;
    if (model !== undefined) chat.model = model;
    if (typeof body.temperature === 'number') chat.temperature = body.temperature;

    const call = callFromRequest(request, reply, chat, taskType, 'complete');
    // Async: the job's result is the chat completion (API.md "Async"), like the chat door's.
    if (wantsAsync(request)) return submitAsync(this.jobs, request, reply, call, 'complete', raw);
    const outcome = await this.completions.complete(call);
    const content = outcome.completion.choices[0]?.message.content ?? '';
    await reply
      .status(200)
      .headers(metaHeaders(outcome.meta, outcome.costNanos))
      .send({
        content,
        model: outcome.meta.model,
        tokens: outcome.completion.usage?.total_tokens ?? 0,
        cost_usd: toUsdNumber(outcome.costNanos),
        cached: outcome.meta.cache === 'hit',
      } satisfies CompleteResponseDto);
  }
}
