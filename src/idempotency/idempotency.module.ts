import { Module } from '@nestjs/common';
import { IdempotencyRepository } from './idempotency.repository.js';
import { IdempotencyService } from './idempotency.service.js';
import { Idempotency1764400006000 } from './migrations/1764400006000-idempotency.js';

export const IDEMPOTENCY_MIGRATIONS = [Idempotency1764400006000];

/** Idempotency keys of sync completion calls (async submits keep theirs on the job). */
@Module({
  providers: [IdempotencyRepository, IdempotencyService],
  exports: [IdempotencyService],
})
export class IdempotencyModule {}
