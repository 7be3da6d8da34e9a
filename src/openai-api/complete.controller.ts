import { Body, Controller, Headers, HttpCode, Post, Req, Res } from '@nestjs/common';
import { ApiBody, ApiHeader, ApiOkResponse, ApiOperation, ApiTags } from '@nestjs/swagger';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { toUsdJson } from '../../libs/money/src/index.js';
import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import { CompletionService } from '../completion/completion.service.js';
import type { JsonOutcome } from '../completion/completion.types.js';
import { GatewayError } from '../core/errors.js';
import { asBody, optionalNumber, rejectUnknownFields } from '../core/validate.js';
import { wantsAsync } from '../core/prefer.js';
import { IdempotencyService } from '../idempotency/idempotency.service.js';
import { Authenticated, DeferredAdmission, SpendsTokens } from '../identity/auth.guard.js';
import { JobsService } from '../jobs/jobs.service.js';
import { refuseCallbackWithoutAsync, submitAsync } from './async-submit.js';
import { parseModelId, parseTaskType } from './chat-request.js';
import { admitted, answerIdempotently, callFromRequest, hasIdempotencyKey, metaHeaders, sendJsonOnce } from './http-call.js';
import { CompleteRequestDto, CompleteResponseDto } from './openai-api.dto.js';

const MAX_PROMPT_CHARS = 1_000_000;
/**
 * Every field this door takes. Unlike the chat door, which passes what it does not know to the
 * upstream (new OpenAI parameters must keep working), this shape is the gateway's own: anything
 * else (`stream`, `messages`, `top_p`, a typo) would be dropped, and the caller would get an
 * answer to a request it did not send, possibly from the cache.
 */
const COMPLETE_FIELDS = ['prompt', 'task_type', 'max_tokens', 'model', 'temperature', 'callback_url'] as const;

/** The seed's simple form: one prompt in, the text and its cost out. Same pipeline as chat. */
@ApiTags('v1')
@Authenticated()
@Controller('v1')
export class CompleteController {
  constructor(
    private readonly completions: CompletionService,
    private readonly jobs: JobsService,
    private readonly idempotency: IdempotencyService,
  ) {}

  @Post('complete')
  @HttpCode(200)
  @ApiOperation({ summary: 'Simple completion: prompt → content, model, tokens, cost' })
  @ApiBody({ type: CompleteRequestDto })
  @ApiHeader({ name: 'x-task-type', required: false, description: 'routing table key; same as body task_type' })
  @ApiHeader({ name: 'prefer', required: false, description: "'respond-async': answer 202 with a job to poll at /v1/jobs/{id}" })
  @ApiHeader({
    name: 'idempotency-key',
    required: false,
    description: 'a repeat within 24 h gets the stored answer, free; 409 while the first still runs; another body → 422. With respond-async: the same job',
  })
  @ApiOkResponse({ type: CompleteResponseDto })
  @DeferredAdmission()
  @SpendsTokens()
  complete(@Req() request: FastifyRequest, @Res() reply: FastifyReply, @Body() raw: unknown, @Headers('x-task-type') taskHeader?: string): Promise<void> {
    return admitted(request, () => this.handle(request, reply, raw, taskHeader));
  }

  private async handle(request: FastifyRequest, reply: FastifyReply, raw: unknown, taskHeader: string | undefined): Promise<void> {
    const body = asBody(raw);
    rejectUnknownFields(body, COMPLETE_FIELDS);
    const prompt = body.prompt;
    if (prompt === undefined || prompt === null) throw new GatewayError('missing_field', "Missing required parameter: 'prompt'.", { param: 'prompt' });
    if (typeof prompt !== 'string' || prompt.length === 0 || prompt.length > MAX_PROMPT_CHARS) {
      throw new GatewayError('invalid_value', "'prompt' must be a non-empty string.", { param: 'prompt' });
    }
    const maxTokens = optionalNumber(body, 'max_tokens', { integer: true, min: 1 });
    const model = body.model === undefined || body.model === null ? undefined : parseModelId(body.model, 'model');
    const taskType =
      body.task_type !== undefined && body.task_type !== null
        ? parseTaskType(body.task_type, 'task_type')
        : taskHeader !== undefined
          ? parseTaskType(taskHeader, 'x-task-type')
          : undefined;
    // A temperature dropped for its type ("0.9") made the call look deterministic, so it was cached.
    const temperature = optionalNumber(body, 'temperature', { min: 0, max: 2 });
    const chat: ChatCompletionRequest = { messages: [{ role: 'user', content: prompt }] };
    if (maxTokens !== undefined) chat.max_tokens = maxTokens;
    if (model !== undefined) chat.model = model;
    if (temperature !== undefined) chat.temperature = temperature;

    const call = callFromRequest(request, reply, chat, taskType, 'complete');
    // Async: the job's result is the chat completion (API.md "Async"), like the chat door's.
    if (wantsAsync(request)) return submitAsync(this.jobs, request, reply, call, 'complete', raw);
    refuseCallbackWithoutAsync(raw);
    if (hasIdempotencyKey(request)) {
      return answerIdempotently(this.idempotency, request, reply, call, 'complete', raw, async (claim) => {
        const outcome = await this.completions.complete(call);
        // Stored as sent: its repeats get this shape, cost_usd included, with x-gateway-cost-usd: 0.
        return sendJsonOnce(claim, reply, outcome.meta, outcome.costNanos, JSON.stringify(simpleAnswer(outcome)));
      });
    }
    const outcome = await this.completions.complete(call);
    await reply.status(200).headers(metaHeaders(outcome.meta, outcome.costNanos)).send(simpleAnswer(outcome));
  }
}

function simpleAnswer(outcome: JsonOutcome): CompleteResponseDto {
  return {
    content: outcome.completion.choices[0]?.message.content ?? '',
    model: outcome.meta.model,
    tokens: outcome.completion.usage?.total_tokens ?? 0,
    // Exact plain decimal (0.00000015, never 1.5e-7), as API.md writes money.
    cost_usd: toUsdJson(outcome.costNanos),
    cached: outcome.meta.cache === 'hit',
  };
}
