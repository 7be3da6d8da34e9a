import { describe, expect, it } from 'vitest';
import type { CompletionCall } from '../completion/completion.types.js';
import { chatCall } from '../completion/testing/completion-call.js';
import type { Principal } from '../identity/principal.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import { cacheKey, cachePlan, cacheScope } from './cache-key.js';

const alice: Principal = { keyId: 'k1', keyPrefix: 'gh-k1', userId: 'u-alice', departmentId: 'd-1', role: 'user', cacheScope: 'user', expiresAt: undefined };
const bob: Principal = { ...alice, keyId: 'k2', userId: 'u-bob' };
const route: ResolvedRoute = {
  requestedTaskType: 'general',
  ruleTaskType: 'general',
  version: 1,
  models: ['openai/gpt-4o-mini'],
  maxTokens: 1024,
  explicitModel: false,
};
const messages = [{ role: 'user', content: 'hi' }];

function call(body: Record<string, unknown>, over: Partial<CompletionCall> = {}): CompletionCall {
  return chatCall(alice, body, over);
}

describe('cachePlan', () => {
  it.each([
    ['temperature > 0', { temperature: 0.2 }, 'temperature'],
    ['n > 1', { n: 3 }, 'n'],
    ['tools', { tools: [{ type: 'function' }] }, 'tools'],
    ['legacy functions', { functions: [{ name: 'f' }] }, 'tools'],
  ])('bypasses %s', (_name, body, reason) => {
    expect(cachePlan(call(body), route, 300)).toBe(reason);
  });

  it('caches temperature 0 or absent, n 1, empty tools', () => {
    for (const body of [{}, { temperature: 0 }, { n: 1 }, { tools: [] }]) expect(typeof cachePlan(call(body), route, 300)).toBe('object');
  });

  it('takes the TTL from the header or the default, and a TTL of 0 means no write', () => {
    expect(cachePlan(call({}), route, 300)).toMatchObject({ ttlMs: 300_000, read: true, write: true });
    expect(cachePlan(call({}, { cacheControl: { read: true, write: true, ttlSeconds: 5 } }), route, 300)).toMatchObject({ ttlMs: 5000 });
    expect(cachePlan(call({}, { cacheControl: { read: true, write: true, ttlSeconds: 0 } }), route, 300)).toMatchObject({ read: true, write: false });
    expect(cachePlan(call({}, { cacheControl: { read: false, write: false, ttlSeconds: undefined } }), route, 300)).toBe('disabled_by_client');
  });

  it("applies the routing rule's cache policy: enabled false bypasses, ttl_seconds is the TTL and a ceiling", () => {
    const ttl = (ttlSeconds: number | undefined) => ({ cacheControl: { read: true, write: true, ttlSeconds } });
    expect(cachePlan(call({}), { ...route, cache: { enabled: false } }, 300)).toBe('disabled_by_rule');
    expect(cachePlan(call({}), { ...route, cache: { enabled: false, ttlSeconds: 60 } }, 300)).toBe('disabled_by_rule');
    const ruled = { ...route, cache: { enabled: true, ttlSeconds: 60 } };
    expect(cachePlan(call({}), ruled, 300)).toMatchObject({ ttlMs: 60_000, read: true, write: true });
    expect(cachePlan(call({}, ttl(5)), ruled, 300)).toMatchObject({ ttlMs: 5000 });
    expect(cachePlan(call({}, ttl(3600)), ruled, 300)).toMatchObject({ ttlMs: 60_000 });
    expect(cachePlan(call({}, ttl(0)), ruled, 300)).toMatchObject({ read: true, write: false });
    // A rule that enables the cache without a TTL leaves the defaults and the header as they were.
    expect(cachePlan(call({}), { ...route, cache: { enabled: true } }, 300)).toMatchObject({ ttlMs: 300_000 });
    expect(cachePlan(call({}, ttl(900)), { ...route, cache: { enabled: true } }, 300)).toMatchObject({ ttlMs: 900_000 });
  });
});

describe('cacheKey', () => {
  const key = (principal: Principal, body: Record<string, unknown>, r: ResolvedRoute = route) => cacheKey(principal, r, { messages, ...body });

  it('is scoped to the user, or to the department when it shares', () => {
    expect(key(alice, {})).not.toBe(key(bob, {}));
    const shared = (p: Principal) => ({ ...p, cacheScope: 'department' as const });
    expect(key(shared(alice), {})).toBe(key(shared(bob), {}));
    expect(cacheScope(shared(alice))).toBe('department:d-1');
    expect(key(shared(alice), {})).not.toBe(key({ ...shared(bob), departmentId: 'd-2' }, {}));
  });

  it('ignores labels, stream flags, field order and the model name once resolved', () => {
    const base = key(alice, { temperature: 0, response_format: { type: 'text' } });
    expect(
      key(alice, {
        response_format: { type: 'text' },
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
        user: 'x',
        model: 'auto',
        task_type: 'general',
      }),
    ).toBe(base);
  });

  it('changes with anything that changes the answer', () => {
    const base = key(alice, {});
    expect(key(alice, { temperature: 0 })).not.toBe(base);
    expect(key(alice, { response_format: { type: 'json_object' } })).not.toBe(base);
    expect(key(alice, { seed: 1 })).not.toBe(base);
    expect(key(alice, {}, { ...route, maxTokens: 10 })).not.toBe(base);
    expect(key(alice, {}, { ...route, models: ['openai/gpt-4o-mini', 'meta-llama/llama-3.1-8b-instruct'] })).not.toBe(base);
    // A new routing version that resolves to the same models keeps the key.
    expect(key(alice, {}, { ...route, version: 7 })).toBe(base);
  });
});
