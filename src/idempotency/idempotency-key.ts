import { hash } from 'node:crypto';
import { GatewayError } from '../core/errors.js';

const MAX_IDEMPOTENCY_KEY = 255;
const PRINTABLE = /^[\x21-\x7e]+$/;

/** The completion doors an idempotency key can be used on (async submits and sync calls alike). */
export type IdempotentDoor = 'chat' | 'complete';

/** The `idempotency-key` header, validated the same way for async submits and sync calls. */
export function parseIdempotencyKey(value: string | string[] | undefined): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value.length === 0 || value.length > MAX_IDEMPOTENCY_KEY || !PRINTABLE.test(value)) {
    throw new GatewayError('invalid_value', `'idempotency-key' must be 1 to ${MAX_IDEMPOTENCY_KEY} printable characters without spaces.`, {
      param: 'idempotency-key',
    });
  }
  return value;
}

/** What makes two requests "the same request" for an idempotency key: door, task type and the body as sent. */
export function submissionHash(door: IdempotentDoor, taskType: string | undefined, raw: unknown): string {
  return hash('sha256', JSON.stringify([door, taskType ?? null, raw]), 'hex');
}
