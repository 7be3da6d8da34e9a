import { Body, Controller, createParamDecorator, Delete, type ExecutionContext, Get, Put } from '@nestjs/common';
import { ApiBody, ApiOperation, ApiParam, ApiTags } from '@nestjs/swagger';
import type { FastifyRequest } from 'fastify';
import { GatewayError } from '../../../core/errors.js';
import { AdminOnly, CurrentPrincipal } from '../../../identity/auth.guard.js';
import type { Principal } from '../../../identity/principal.js';
import { PricingService } from '../pricing.service.js';
import { priceView, PutPriceDto } from './pricing-admin.dto.js';

/** Model ids carry a slash (`openai/gpt-4o-mini`), so the model is the rest of the path. */
function modelParam(value: string | undefined): string {
  const model = (value ?? '').trim();
  if (model === '' || model.length > 200)
    throw new GatewayError('invalid_value', 'The path must end with a model id, e.g. /admin/pricing/openai/gpt-4o-mini.', { param: 'model' });
  return model;
}

/**
 * Swagger writes the `*` route as `/admin/pricing/{path}`, so the document names the parameter
 * `path`. The handlers read the wildcard through WildcardPath rather than @Param('*'), which Swagger
 * would also document, as a `*` parameter no path has.
 */
const MODEL_PARAM = { name: 'path', description: 'model id, slash included, e.g. openai/gpt-4o-mini' };
const WildcardPath = createParamDecorator(
  (_data: unknown, context: ExecutionContext): string | undefined =>
    context.switchToHttp().getRequest<FastifyRequest<{ Params: { '*'?: string } }>>().params['*'],
);

@ApiTags('admin: pricing')
@AdminOnly()
@Controller('admin/pricing')
export class PricingAdminController {
  constructor(private readonly pricing: PricingService) {}

  @Get()
  @ApiOperation({ summary: 'Prices in force per model (override > upstream /models > static file), and the fallback price' })
  list() {
    const { data, fallback, upstreamRefreshedAt } = this.pricing.list();
    return { object: 'list', data: data.map(priceView), fallback: priceView(fallback), upstream_refreshed_at: upstreamRefreshedAt?.toISOString() ?? null };
  }

  @Get('*')
  @ApiParam(MODEL_PARAM)
  get(@WildcardPath() model: string) {
    return priceView(this.pricing.entryFor(modelParam(model)));
  }

  @Put('*')
  @ApiOperation({ summary: 'Override the per-token price of one model (takes precedence over upstream and static prices)' })
  @ApiParam(MODEL_PARAM)
  @ApiBody({ type: PutPriceDto })
  async set(@WildcardPath() model: string, @Body() body: unknown, @CurrentPrincipal() principal: Principal) {
    return priceView(await this.pricing.setOverride(modelParam(model), PutPriceDto.parse(body), principal.userId));
  }

  @Delete('*')
  @ApiOperation({ summary: 'Remove an override; the upstream or static price applies again' })
  @ApiParam(MODEL_PARAM)
  async remove(@WildcardPath() model: string) {
    return priceView(await this.pricing.deleteOverride(modelParam(model)));
  }
}
