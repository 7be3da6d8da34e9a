import { describe, expect, it } from 'vitest';
import type { Principal } from '../identity/principal.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import type { CompletionCall } from './completion.types.js';
import { chatCall } from './testing/completion-call.js';
import { requestedMaxTokens, upstreamBody } from './upstream-body.js';

const alice: Principal = { keyId: 'k1', keyPrefix: 'gh-k1', userId: 'u', departmentId: 'd', role: 'user', cacheScope: 'user', expiresAt: undefined };
const messages = [{ role: 'user', content: 'hi' }];

function call(body: Record<string, unknown>): CompletionCall {
  return chatCall(alice, body);
}

/** The route the resolver gives for a request limit, with a rule cap of 1024 (routing-resolver.ts). */
function routeFor(requested: number | undefined, cap = 1024): ResolvedRoute {
  return {
    requestedTaskType: 'general',
    ruleTaskType: 'general',
    version: 1,
    models: ['m/a'],
    maxTokens: requested === undefined ? cap : Math.min(requested, cap),
    explicitModel: false,
  };
}

/** What goes upstream for a body, through the same steps the pipeline takes. */
function sent(body: Record<string, unknown>): Record<string, unknown> {
  const c = call(body);
  return upstreamBody(c, routeFor(requestedMaxTokens(c)), 'm/a', false);
}

describe('requestedMaxTokens', () => {
  it.each([
    [{}, undefined],
    [{ max_tokens: 50 }, 50],
    [{ max_completion_tokens: 70 }, 70],
    [{ max_tokens: 100_000, max_completion_tokens: 10 }, 10],
    [{ max_tokens: 10, max_completion_tokens: 100_000 }, 10],
    [{ max_tokens: 100_000, max_completion_tokens: null }, 100_000],
    [{ max_tokens: null, max_completion_tokens: 30 }, 30],
    [{ max_tokens: null, max_completion_tokens: null }, undefined],
  ])('%j → %s', (body, expected) => {
    expect(requestedMaxTokens(call(body))).toBe(expected);
  });
});

describe('upstreamBody token limits', () => {
  it('never sends a limit above the one reserved for (route.maxTokens)', () => {
    const cases: Array<Record<string, unknown>> = [
      {},
      { max_tokens: 100_000 },
      { max_completion_tokens: 100_000 },
      { max_tokens: 100_000, max_completion_tokens: 10 },
      { max_tokens: 10, max_completion_tokens: 100_000 },
      { max_tokens: 100_000, max_completion_tokens: null },
      { max_tokens: null, max_completion_tokens: 100_000 },
      { max_tokens: null, max_completion_tokens: null },
    ];
    for (const body of cases) {
      const c = call(body);
      const route = routeFor(requestedMaxTokens(c));
      const out = upstreamBody(c, route, 'm/a', false);
      const limits = [out.max_tokens, out.max_completion_tokens].filter((v) => v !== undefined);
      expect(limits.length, JSON.stringify(body)).toBeGreaterThan(0);
      for (const limit of limits) expect(limit, JSON.stringify(body)).toBe(route.maxTokens);
    }
  });

  it('caps both names when both are sent, to the smaller request', () => {
    expect(sent({ max_tokens: 100_000, max_completion_tokens: 10 })).toMatchObject({ max_tokens: 10, max_completion_tokens: 10 });
    expect(sent({ max_tokens: 20, max_completion_tokens: 100_000 })).toMatchObject({ max_tokens: 20, max_completion_tokens: 20 });
  });

  it('treats null as absent: the other name carries the cap, and null is not forwarded', () => {
    const a = sent({ max_tokens: 100_000, max_completion_tokens: null });
    expect(a.max_tokens).toBe(1024);
    expect('max_completion_tokens' in a).toBe(false);
    const b = sent({ max_tokens: null, max_completion_tokens: 100_000 });
    expect(b.max_completion_tokens).toBe(1024);
    expect('max_tokens' in b).toBe(false);
    const c = sent({ max_tokens: null, max_completion_tokens: null });
    expect(c.max_tokens).toBe(1024);
    expect('max_completion_tokens' in c).toBe(false);
  });

  it("keeps the client's choice of name", () => {
    const a = sent({ max_completion_tokens: 64 });
    expect(a.max_completion_tokens).toBe(64);
    expect('max_tokens' in a).toBe(false);
    expect(sent({})).toMatchObject({ max_tokens: 1024 });
  });

  it('drops gateway fields and sets the model', () => {
    const out = sent({ task_type: 'code', models: ['x/y'], callback_url: 'https://e.example', model: 'auto' });
    expect(out).toMatchObject({ model: 'm/a', messages });
    for (const field of ['task_type', 'models', 'callback_url']) expect(field in out).toBe(false);
  });
});
