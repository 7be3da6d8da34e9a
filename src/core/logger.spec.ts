import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { batchedDestination, createLogger, requestLineLogger } from './logger.js';

/** A destination that keeps each write it is handed, as one string per write. */
function recorder(): { writes: string[]; write(text: string): void } {
  const writes: string[] = [];
  return { writes, write: (text: string) => void writes.push(text) };
}

function lines(writes: readonly string[]): Array<Record<string, unknown>> {
  return writes
    .join('')
    .split('\n')
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('createLogger redaction', () => {
  it('censors the exact paths and, one level down, the wildcard ones', () => {
    const out = recorder();
    const logger = createLogger('info', out);
    logger.info({ authorization: 'Bearer gh-top', headers: { authorization: 'Bearer gh-header' }, upstream: { apiKey: 'sk-nested', password: 'pw' } }, 'x');
    const [line] = lines(out.writes);
    expect(line).toMatchObject({ authorization: '[redacted]', headers: { authorization: '[redacted]' }, upstream: { apiKey: '[redacted]', password: '[redacted]' } });
    expect(out.writes.join('')).not.toMatch(/gh-top|gh-header|sk-nested|"pw"/);
  });

  it('keeps the exact paths on the per-request lines, which skip the wildcard ones', () => {
    const out = recorder();
    const lineLogger = requestLineLogger(createLogger('info', out), { context: 'Completion' });
    lineLogger.info({ key: 'gh-secret', headers: { authorization: 'Bearer gh-header' }, keyPrefix: 'gh-secr' }, 'completion');
    const [line] = lines(out.writes);
    expect(line).toMatchObject({ context: 'Completion', key: '[redacted]', headers: { authorization: '[redacted]' }, keyPrefix: 'gh-secr' });
  });
});

describe('batchedDestination', () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it('hands lines over together, flushMs after the first of them', () => {
    const out = recorder();
    const batched = batchedDestination(out, 200, 4096);
    batched.write('a\n');
    vi.advanceTimersByTime(150);
    batched.write('b\n');
    expect(out.writes).toEqual([]);
    vi.advanceTimersByTime(50);
    expect(out.writes).toEqual(['a\nb\n']);
    // Nothing waits, so the timer is not armed again.
    vi.advanceTimersByTime(1000);
    expect(out.writes).toEqual(['a\nb\n']);
  });

  it('writes at once when maxChars are waiting, and flush and take empty the batch', () => {
    const out = recorder();
    const batched = batchedDestination(out, 200, 10);
    batched.write('12345\n');
    batched.write('67890\n');
    expect(out.writes).toEqual(['12345\n67890\n']);
    batched.write('c\n');
    const flushed = vi.fn();
    batched.flush(flushed);
    expect(flushed).toHaveBeenCalledOnce();
    expect(out.writes).toEqual(['12345\n67890\n', 'c\n']);
    batched.write('d\n');
    expect(batched.take()).toBe('d\n');
    vi.advanceTimersByTime(1000);
    expect(out.writes).toHaveLength(2);
  });

  it('keeps every line of a logger in order across batches', () => {
    const out = recorder();
    const logger = createLogger('info', batchedDestination(out, 200, 300));
    for (let i = 0; i < 20; i++) logger.info({ i }, 'line');
    vi.advanceTimersByTime(200);
    expect(out.writes.length).toBeGreaterThan(1);
    expect(lines(out.writes).map((line) => line.i)).toEqual([...Array(20).keys()]);
  });
});
