import { describe, expect, it } from 'vitest';
import { loadConfig } from '../config/config.js';
import { UpstreamFailure } from './llm-client.js';
import { RetryPolicy, SYSTEM_RETRY_ENV } from './retry-policy.js';
import { failureAction } from './upstream-errors.js';

const CONFIG = { attemptsPerModel: 4, baseDelayMs: 100, maxDelayMs: 1000, retryAfterCapMs: 5000, deadlineMs: 60_000 };
const http = (status: number, retryAfterMs?: number) => new UpstreamFailure('http', `HTTP ${status}`, status, retryAfterMs);

describe('RetryPolicy', () => {
  it('backs off exponentially with full jitter, capped', () => {
    const top = new RetryPolicy(CONFIG, () => 0.999999);
    expect([1, 2, 3, 4, 5, 6].map((n) => top.backoffMs(n))).toEqual([99, 199, 399, 799, 999, 999]);
    const bottom = new RetryPolicy(CONFIG, () => 0);
    expect([1, 2, 3].map((n) => bottom.backoffMs(n))).toEqual([0, 0, 0]);
    const half = new RetryPolicy(CONFIG, () => 0.5);
    expect([1, 2, 3, 4].map((n) => half.backoffMs(n))).toEqual([50, 100, 200, 400]);
  });

  it('stops after attemptsPerModel tries of one model', () => {
    const policy = new RetryPolicy(CONFIG, () => 0.5);
    expect([1, 2, 3, 4].map((n) => policy.delayBeforeRetry(n, http(503)))).toEqual([50, 100, 200, undefined]);
  });

  it('honours retry-after (never earlier, jitter may add) up to the cap, then gives up on the model', () => {
    const policy = new RetryPolicy(CONFIG, () => 0.5);
    expect(policy.delayBeforeRetry(1, http(429, 1000))).toBe(1000);
    expect(policy.delayBeforeRetry(1, http(429, 10))).toBe(50);
    expect(policy.delayBeforeRetry(1, http(429, 5000))).toBe(5000);
    expect(policy.delayBeforeRetry(1, http(429, 5001))).toBeUndefined();
  });

  it('sleeps, and wakes early (false) when the call is aborted', async () => {
    expect(await SYSTEM_RETRY_ENV.sleep(1, new AbortController().signal)).toBe(true);
    const controller = new AbortController();
    const pending = SYSTEM_RETRY_ENV.sleep(60_000, controller.signal);
    controller.abort();
    expect(await pending).toBe(false);
    expect(await SYSTEM_RETRY_ENV.sleep(60_000, controller.signal)).toBe(false);
  });
});

describe('failureAction (which failures are retried, which move on, which stop)', () => {
  it.each([
    [429, 'retry'],
    [500, 'retry'],
    [502, 'retry'],
    [503, 'retry'],
    [504, 'retry'],
    [408, 'retry'],
    [529, 'retry'],
    [501, 'next_model'],
    [404, 'next_model'],
    [400, 'stop'],
    [401, 'stop'],
    [402, 'stop'],
    [403, 'stop'],
    [413, 'stop'],
    [422, 'stop'],
  ] as const)('HTTP %i → %s', (status, action) => {
    expect(failureAction(http(status))).toBe(action);
  });

  it.each([
    ['timeout', 'retry'],
    ['connection', 'retry'],
    ['bad_response', 'retry'],
    ['cut', 'retry'],
    ['aborted', 'stop'],
  ] as const)('%s → %s', (kind, action) => {
    expect(failureAction(new UpstreamFailure(kind, kind))).toBe(action);
  });

  it('hands a timeout over to the next model when one remains; the others act as on the last model', () => {
    expect(failureAction(new UpstreamFailure('timeout', 'timeout'), true)).toBe('next_model');
    expect(failureAction(new UpstreamFailure('connection', 'connection'), true)).toBe('retry');
    expect(failureAction(http(503), true)).toBe('retry');
  });
});

describe('retry configuration', () => {
  it('has defaults and reads every variable', () => {
    expect(loadConfig({}).upstream.retry).toEqual({ attemptsPerModel: 2, baseDelayMs: 250, maxDelayMs: 4000, retryAfterCapMs: 10_000, deadlineMs: 120_000 });
    const c = loadConfig({
      UPSTREAM_RETRY_ATTEMPTS: '3',
      UPSTREAM_RETRY_BASE_MS: '10',
      UPSTREAM_RETRY_MAX_DELAY_MS: '40',
      UPSTREAM_RETRY_AFTER_MAX_MS: '1500',
      UPSTREAM_DEADLINE_MS: '9000',
    });
    expect(c.upstream.retry).toEqual({ attemptsPerModel: 3, baseDelayMs: 10, maxDelayMs: 40, retryAfterCapMs: 1500, deadlineMs: 9000 });
  });

  it('uses OpenRouter native fallback only where the upstream is OpenRouter, unless told', () => {
    expect(loadConfig({}).upstream.nativeFallback).toBe(true);
    expect(loadConfig({ OPENROUTER_BASE_URL: 'http://127.0.0.1:9999/v1' }).upstream.nativeFallback).toBe(false);
    expect(loadConfig({ OPENROUTER_BASE_URL: 'http://127.0.0.1:9999/v1', UPSTREAM_NATIVE_FALLBACK: 'true' }).upstream.nativeFallback).toBe(true);
    expect(loadConfig({ UPSTREAM_NATIVE_FALLBACK: 'false' }).upstream.nativeFallback).toBe(false);
  });

  it('lists bad retry settings with the others', () => {
    expect(() => loadConfig({ UPSTREAM_RETRY_ATTEMPTS: '0', UPSTREAM_NATIVE_FALLBACK: 'maybe' })).toThrow(
      /UPSTREAM_RETRY_ATTEMPTS[\s\S]*UPSTREAM_NATIVE_FALLBACK|UPSTREAM_NATIVE_FALLBACK[\s\S]*UPSTREAM_RETRY_ATTEMPTS/,
    );
  });
});
