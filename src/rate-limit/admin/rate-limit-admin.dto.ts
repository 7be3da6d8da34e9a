import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { GatewayError } from '../../core/errors.js';
import { asBody, rejectUnknownFields, requiredNumber } from '../../core/validate.js';
import type { Limit, LimitScope, LimitView } from '../rate-limit-overrides.service.js';

const PATH_SCOPES: Record<string, LimitScope> = { keys: 'key', users: 'user', departments: 'department' };
const SCOPE_PATHS: Record<LimitScope, string> = { key: 'keys', user: 'users', department: 'departments' };

export function parseScope(value: string): LimitScope {
  const scope = PATH_SCOPES[value];
  if (scope === undefined) throw new GatewayError('not_found', `Unknown rate-limit scope '${value.slice(0, 32)}': use keys, users or departments.`);
  return scope;
}

export class PutRateLimitDto {
  @ApiProperty({ example: 600, description: 'requests per minute' }) requests_per_minute!: number;
  // `type` spelled out: reflection sees `number | null` as Object.
  @ApiPropertyOptional({ example: 200000, nullable: true, type: Number, description: 'tokens per minute; null or absent = no token limit' })
  tokens_per_minute?: number | null;

  static parse(raw: unknown): Limit {
    const body = asBody(raw);
    rejectUnknownFields(body, ['requests_per_minute', 'tokens_per_minute']);
    const requestsPerMinute = requiredNumber(body, 'requests_per_minute', { integer: true, min: 1, max: 10_000_000 });
    const tpm = body.tokens_per_minute;
    const tokensPerMinute =
      tpm === undefined || tpm === null ? undefined : requiredNumber(body, 'tokens_per_minute', { integer: true, min: 1, max: 1_000_000_000 });
    return { requestsPerMinute, tokensPerMinute };
  }
}

export class RateLimitViewDto {
  @ApiProperty({ example: 'rate_limit' }) object!: 'rate_limit';
  @ApiProperty({ enum: ['keys', 'users', 'departments'] }) scope!: string;
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty() requests_per_minute!: number;
  @ApiProperty({ nullable: true, type: Number }) tokens_per_minute!: number | null;
  @ApiProperty({ enum: ['override', 'default'], description: 'an admin override, or the configured default' }) source!: 'override' | 'default';
  @ApiProperty({ nullable: true, type: String }) updated_at!: string | null;
  @ApiProperty({ nullable: true, type: String }) updated_by!: string | null;
}

export const rateLimitView = (v: LimitView): RateLimitViewDto => ({
  object: 'rate_limit',
  scope: SCOPE_PATHS[v.scope],
  id: v.id,
  requests_per_minute: v.requestsPerMinute,
  tokens_per_minute: v.tokensPerMinute ?? null,
  source: v.source,
  updated_at: v.updatedAt ?? null,
  updated_by: v.updatedBy ?? null,
});
