import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import type { UsdJson } from '../../libs/money/src/index.js';

const CALLBACK_HOSTS =
  'Public hosts only (400 for private, loopback, link-local addresses and names like localhost), unless the operator lists others in JOBS_CALLBACK_ALLOWED_HOSTS.';

/** Documentation of the body; any other OpenAI parameter is passed through untouched. */
export class ChatMessageDto {
  @ApiProperty({ example: 'user' }) role!: string;
  @ApiProperty({ example: 'Say hello', description: 'string or content parts' }) content!: unknown;
}

export class ChatCompletionRequestDto {
  @ApiPropertyOptional({ example: 'auto', description: "a model id, or 'auto'/absent to let the routing table decide" }) model?: string;
  @ApiProperty({ type: [ChatMessageDto] }) messages!: ChatMessageDto[];
  @ApiPropertyOptional({ example: 'code', description: 'routing table key (gateway extension)' }) task_type?: string;
  @ApiPropertyOptional({ type: [String], description: 'explicit fallback models (OpenRouter style)' }) models?: string[];
  @ApiPropertyOptional() stream?: boolean;
  @ApiPropertyOptional({ example: 256 }) max_tokens?: number;
  @ApiPropertyOptional({ example: 0, minimum: 0, maximum: 2 }) temperature?: number;
  @ApiPropertyOptional({
    description: `with prefer: respond-async: the finished job is POSTed here, signed: x-gatehouse-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>"> with JOBS_CALLBACK_SECRET, and a second v1 with the previous secret while it is rotated (also x-gatehouse-timestamp: <t>, x-gatehouse-job-id); accept any v1 that matches. Verify against the raw bytes before parsing, compare in constant time, and refuse a t more than 5 minutes from your clock. ${CALLBACK_HOSTS}`,
  })
  callback_url?: string;
}

export class CompleteRequestDto {
  @ApiProperty({ example: 'Summarise the plot of Hamlet in one line.' }) prompt!: string;
  @ApiPropertyOptional({ example: 'general' }) task_type?: string;
  @ApiPropertyOptional({ example: 1024 }) max_tokens?: number;
  @ApiPropertyOptional({ example: 'auto' }) model?: string;
  @ApiPropertyOptional({ example: 0, minimum: 0, maximum: 2 }) temperature?: number;
  @ApiPropertyOptional({ description: `with prefer: respond-async: the finished job is POSTed here, signed. ${CALLBACK_HOSTS}` }) callback_url?: string;
}

export class CompleteResponseDto {
  @ApiProperty() content!: string;
  @ApiProperty() model!: string;
  @ApiProperty({ description: 'total tokens' }) tokens!: number;
  @ApiProperty({ example: 0.000123, type: Number }) cost_usd!: UsdJson;
  @ApiProperty() cached!: boolean;
}
