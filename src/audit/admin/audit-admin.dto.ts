import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { GatewayError } from '../../core/errors.js';
import { isUuid, queryDate, rejectUnknownQuery } from '../../core/validate.js';
import type { StoredAuditEvent } from '../audit-event.js';
import type { AuditQuery, AuditVerifyRange } from '../audit.repository.js';

const DEFAULT_LIMIT = 50;
const MAX_LIMIT = 500;
const SEQ = /^\d{1,18}$/;
// Key prefixes are printable and short; anything else cannot match and is a typo worth naming.
const KEY_PREFIX = /^[\x21-\x7e]{1,64}$/;

function single(query: Record<string, unknown>, param: string): string | undefined {
  const value = query[param];
  if (value === undefined || value === '') return undefined;
  if (typeof value !== 'string') throw new GatewayError('invalid_value', `'${param}' must be given once.`, { param });
  return value;
}

function ordered(from: Date | undefined, to: Date | undefined): void {
  if (from !== undefined && to !== undefined && from.getTime() > to.getTime()) {
    throw new GatewayError('invalid_value', "'from' must not be after 'to'.", { param: 'from' });
  }
}

export class AuditListQueryDto {
  static parse(raw: unknown): AuditQuery {
    const query = (typeof raw === 'object' && raw !== null ? raw : {}) as Record<string, unknown>;
    rejectUnknownQuery(query, ['actor', 'action', 'from', 'to', 'cursor', 'limit']);
    const actor = single(query, 'actor');
    if (actor !== undefined && !isUuid(actor) && !KEY_PREFIX.test(actor)) {
      throw new GatewayError('invalid_value', "'actor' must be a user id, a key id or a key prefix.", { param: 'actor' });
    }
    const action = single(query, 'action');
    if (action !== undefined && action.length > 200) throw new GatewayError('invalid_value', "'action' is longer than 200 characters.", { param: 'action' });
    const from = queryDate(single(query, 'from'), 'from');
    const to = queryDate(single(query, 'to'), 'to');
    ordered(from, to);
    const cursor = single(query, 'cursor');
    if (cursor !== undefined && !SEQ.test(cursor))
      throw new GatewayError('invalid_value', "'cursor' must be the next_cursor of a previous page.", { param: 'cursor' });
    const limitRaw = single(query, 'limit');
    const limit = limitRaw === undefined ? DEFAULT_LIMIT : Number(limitRaw);
    if (!/^\d+$/.test(limitRaw ?? '1') || !Number.isInteger(limit) || limit < 1 || limit > MAX_LIMIT) {
      throw new GatewayError('invalid_value', `'limit' must be an integer from 1 to ${MAX_LIMIT}.`, { param: 'limit' });
    }
    return { actor, action, from, to, beforeSeq: cursor, limit };
  }
}

export class AuditVerifyQueryDto {
  /** `from`/`to`: a seq (digits) or an ISO-8601 date-time. */
  static parse(raw: unknown): AuditVerifyRange {
    const query = (typeof raw === 'object' && raw !== null ? raw : {}) as Record<string, unknown>;
    rejectUnknownQuery(query, ['from', 'to']);
    const range: AuditVerifyRange = {};
    const from = single(query, 'from');
    const to = single(query, 'to');
    if (from !== undefined) {
      if (SEQ.test(from)) range.fromSeq = from;
      else range.from = queryDate(from, 'from');
    }
    if (to !== undefined) {
      if (SEQ.test(to)) range.toSeq = to;
      else range.to = queryDate(to, 'to');
    }
    ordered(range.from, range.to);
    if (range.fromSeq !== undefined && range.toSeq !== undefined && BigInt(range.fromSeq) > BigInt(range.toSeq)) {
      throw new GatewayError('invalid_value', "'from' must not be after 'to'.", { param: 'from' });
    }
    return range;
  }
}

export class AuditEventDto {
  @ApiProperty({ description: 'position in the chain (newest is highest)' }) seq!: number;
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty({ format: 'date-time' }) at!: string;
  @ApiPropertyOptional({ format: 'uuid', nullable: true }) actor_user_id!: string | null;
  @ApiPropertyOptional({ format: 'uuid', nullable: true }) actor_key_id!: string | null;
  @ApiPropertyOptional({ enum: ['user', 'admin'], nullable: true }) actor_role!: string | null;
  @ApiProperty({ example: 'POST /admin/keys', description: '`METHOD route` for admin changes, `completion` for model calls' }) action!: string;
  @ApiPropertyOptional({ example: 'keys', nullable: true }) target_type!: string | null;
  @ApiPropertyOptional({ nullable: true }) target_id!: string | null;
  @ApiPropertyOptional({ nullable: true }) request_id!: string | null;
  @ApiPropertyOptional({ nullable: true, description: 'HTTP status the caller got' }) status!: number | null;
  @ApiProperty({
    type: 'object',
    additionalProperties: true,
    description: 'redacted summary: body, result ids, error code; for completions route, model, cache, attempts, outcome, cost',
  })
  details!: Record<string, unknown>;
  @ApiProperty() prev_hash!: string;
  @ApiProperty({ description: 'sha256(prev_hash || canonical JSON of the event)' }) hash!: string;
}

export class AuditListDto {
  @ApiProperty({ example: 'list' }) object!: string;
  @ApiProperty({ type: [AuditEventDto] }) data!: AuditEventDto[];
  @ApiPropertyOptional({ nullable: true, description: 'pass as `cursor` for the next (older) page; null on the last page' }) next_cursor!: string | null;
}

class ChainHeadDto {
  @ApiProperty() seq!: number;
  @ApiProperty() hash!: string;
}

export class AuditVerifyDto {
  @ApiProperty() ok!: boolean;
  @ApiProperty({ description: 'events recomputed' }) checked!: number;
  @ApiPropertyOptional({ nullable: true, description: 'seq of the first event whose link or hash does not recompute' }) first_break!: number | null;
  @ApiProperty({ type: ChainHeadDto, description: 'the chain head verified against; keep it elsewhere to detect a rewritten chain' }) head!: ChainHeadDto;
}

export function auditEventView(e: StoredAuditEvent): AuditEventDto {
  return {
    seq: Number(e.seq),
    id: e.id,
    at: e.at.toISOString(),
    actor_user_id: e.actorUserId,
    actor_key_id: e.actorKeyId,
    actor_role: e.actorRole,
    action: e.action,
    target_type: e.targetType,
    target_id: e.targetId,
    request_id: e.requestId,
    status: e.status,
    details: e.details,
    prev_hash: e.prevHash,
    hash: e.hash,
  };
}
