import { describe, expect, it } from 'vitest';
import { parseIdempotencyKey, submissionHash } from './idempotency-key.js';

describe('idempotency keys (async submits and sync calls alike)', () => {
  it('takes idempotency keys of printable characters only, naming the header when wrong', () => {
    expect(parseIdempotencyKey(undefined)).toBeUndefined();
    expect(parseIdempotencyKey('order-42:retry_1')).toBe('order-42:retry_1');
    for (const bad of ['', 'with space', 'x'.repeat(256), ['a', 'b']]) {
      expect(() => parseIdempotencyKey(bad)).toThrow(expect.objectContaining({ code: 'invalid_value', param: 'idempotency-key' }));
    }
  });

  it('hashes door, task type and body, so the same key with another request is told apart', () => {
    const body = { messages: [{ role: 'user', content: 'x' }] };
    expect(submissionHash('chat', undefined, body)).toBe(submissionHash('chat', undefined, { messages: [{ role: 'user', content: 'x' }] }));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('complete', undefined, body));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('chat', 'code', body));
    expect(submissionHash('chat', undefined, body)).not.toBe(submissionHash('chat', undefined, { messages: [{ role: 'user', content: 'y' }] }));
  });
});
