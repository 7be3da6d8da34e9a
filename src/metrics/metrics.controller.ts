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
  scrape(@Req() request: FastifyRequest, @Res() reply: FastifyReply): void {
    if (!this.access.allows(request.headers.authorization)) throw new GatewayError('invalid_api_key', MetricsAccess.REFUSAL);
    // The exporter writes the response itself; Fastify steps aside, so our headers go on raw.
    reply.hijack();
    // What the hooks set (x-request-id, the mock's mark) would be lost with Fastify's reply.
    for (const [name, value] of Object.entries(reply.getHeaders())) if (value !== undefined) reply.raw.setHeader(name, value);
    reply.raw.setHeader('cache-control', 'no-store');
    this.telemetry.exporter.getMetricsRequestHandler(request.raw, reply.raw);
  }
}
