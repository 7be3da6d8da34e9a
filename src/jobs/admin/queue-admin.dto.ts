import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { GatewayError } from '../../core/errors.js';

// Documentation of the wire shapes for /docs; the views themselves are built in job.types.ts.

export class JobErrorDto {
  @ApiProperty() message!: string;
  @ApiProperty({ example: 'upstream_error' }) type!: string;
  @ApiProperty({ example: 'upstream_error', nullable: true }) code!: string | null;
  @ApiProperty({ nullable: true }) param!: string | null;
}

export class JobDto {
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty({ example: 'gateway.job' }) object!: string;
  @ApiProperty({ enum: ['queued', 'running', 'completed', 'failed'] }) status!: string;
  @ApiProperty({ description: 'the chat completion, once completed', nullable: true, type: Object }) result!: unknown;
  @ApiProperty({ type: JobErrorDto, nullable: true, description: 'the last error (while retrying too)' }) error!: JobErrorDto | null;
  @ApiProperty({ description: 'tries so far' }) attempts!: number;
  @ApiProperty({ description: 'failed after its last try; an admin may retry it' }) dead_lettered!: boolean;
  @ApiProperty({ format: 'date-time' }) created_at!: string;
  @ApiProperty({ format: 'date-time', nullable: true }) started_at!: string | null;
  @ApiProperty({ format: 'date-time', nullable: true }) completed_at!: string | null;
  @ApiProperty({ nullable: true, description: 'the model that answered' }) model!: string | null;
  @ApiProperty({ nullable: true, example: 0.000123, description: 'charged cost in USD' }) cost_usd!: number | null;
}

export class AdminJobDto extends JobDto {
  @ApiProperty({ format: 'uuid' }) user_id!: string;
  @ApiProperty({ format: 'uuid' }) department_id!: string;
  @ApiProperty({ format: 'uuid' }) key_id!: string;
  @ApiProperty({ enum: ['chat', 'complete'] }) door!: string;
  @ApiProperty() request_id!: string;
}

export class DeadJobListDto {
  @ApiProperty({ example: 'list' }) object!: string;
  @ApiProperty({ type: [AdminJobDto] }) data!: AdminJobDto[];
  @ApiProperty() has_more!: boolean;
}

export class QueueCountsDto {
  @ApiProperty() queued!: number;
  @ApiProperty() running!: number;
  @ApiProperty() completed!: number;
  @ApiProperty({ description: 'all failed jobs, dead-lettered ones included' }) failed!: number;
  @ApiProperty() dead_lettered!: number;
}

export class BrokerCountsDto {
  @ApiProperty() waiting!: number;
  @ApiProperty() active!: number;
  @ApiProperty({ description: 'waiting out a retry backoff' }) delayed!: number;
}

export class QueueStatsDto {
  @ApiProperty({ example: 'gateway.queue' }) object!: string;
  @ApiProperty({ enum: ['inline', 'bullmq'] }) driver!: string;
  @ApiProperty({ description: 'whether this instance runs jobs (GATEHOUSE_ROLE worker or all)' }) processing!: boolean;
  @ApiProperty() max_queued!: number;
  @ApiProperty() max_attempts!: number;
  @ApiProperty({ type: QueueCountsDto, description: 'job records by state (all instances)' }) counts!: QueueCountsDto;
  @ApiPropertyOptional({ type: BrokerCountsDto, nullable: true, description: 'what the queue holds now; null when unreachable' })
  broker!: BrokerCountsDto | null;
}

export class DeletedDeadJobDto {
  @ApiProperty({ format: 'uuid' }) id!: string;
  @ApiProperty({ example: 'gateway.job' }) object!: string;
  @ApiProperty({ description: 'removed from the dead-letter queue; the job stays readable as failed' }) deleted!: boolean;
}

export function parseLimit(raw: string | undefined): number {
  if (raw === undefined || raw === '') return 50;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 500) throw new GatewayError('invalid_value', "'limit' must be an integer from 1 to 500.", { param: 'limit' });
  return n;
}
