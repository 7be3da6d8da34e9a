import { Controller, Get, Req, Res } from '@nestjs/common';
import { ApiOperation, ApiProduces, ApiTags } from '@nestjs/swagger';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { GatewayError } from '../core/errors.js';
import { MetricsAccess } from './metrics-access.js';
import { Telemetry } from './telemetry.js';

/**
 * Prometheus scrapes the gateway's own HTTP server: one port to expose, probe and secure (the
 * exporter never opens its own). No API key; METRICS_TOKEN when set (docs/operations.md).
 */
@ApiTags('operations')
@Controller('metrics')
export class MetricsController {
  constructor(
    private readonly telemetry: Telemetry,
    private readonly access: MetricsAccess,
  ) {}

  @Get()
  @ApiOperation({ summary: 'Prometheus text format; Authorization: Bearer <METRICS_TOKEN> when that is set' })
  @ApiProduces('text/plain')
  async scrape(@Req() request: FastifyRequest, @Res() reply: FastifyReply): Promise<void> {
    if (!this.access.allows(request.headers.authorization)) throw new GatewayError('invalid_api_key', MetricsAccess.REFUSAL);
    // A 503 is sent, not thrown: the error filter would log it on every scrape; scrape() logs it once.
    const answer = await this.telemetry.scrape();
    await reply.code(answer.status).header('content-type', answer.contentType).header('cache-control', 'no-store').send(answer.body);
  }
}
