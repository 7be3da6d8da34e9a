import { hash, timingSafeEqual } from 'node:crypto';
import { Injectable } from '@nestjs/common';
import { AppConfig } from '../config/config.js';

/**
 * Who may scrape: anyone when METRICS_TOKEN is unset (keep /metrics off the public ingress), else
 * only `Authorization: Bearer <METRICS_TOKEN>`. Label values name models, routes and outcomes,
 * never keys or users, but traffic shape is still nobody else's business.
 */
@Injectable()
export class MetricsAccess {
  static readonly REFUSAL = 'GET /metrics needs the METRICS_TOKEN as a bearer token.';
  private readonly tokenDigest: Buffer | undefined;

  constructor(config: AppConfig) {
    const token = config.telemetry.metricsToken;
    this.tokenDigest = token === undefined ? undefined : digest(token);
  }

  allows(authorization: string | undefined): boolean {
    if (this.tokenDigest === undefined) return true;
    const match = authorization === undefined ? null : /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    // Digests of equal length, compared in constant time: not even the token's length leaks.
    return match?.[1] !== undefined && timingSafeEqual(digest(match[1]), this.tokenDigest);
  }
}

function digest(value: string): Buffer {
  return hash('sha256', value, 'buffer');
}
