import { describe, expect, it } from 'vitest';
import { GatewayError } from '../core/errors.js';
import { compileTable, resolveRoute, type RouteRequest } from './routing-resolver.js';
import { routeHeader, type RoutingTable, SEED_ROUTING_TABLE } from './routing-table.js';

const SALES = '11111111-1111-4111-8111-111111111111';
const LAB = '22222222-2222-4222-8222-222222222222';

const TABLE: RoutingTable = {
  version: 7,
  updated_at: '2026-01-05T12:00:00.000Z',
  updated_by: 'admin',
  default_task_type: 'general',
  rules: [
    { task_type: 'general', model: 'openai/gpt-4o-mini', fallbacks: [] },
    {
      task_type: 'code',
      model: 'anthropic/claude-3.5-sonnet',
      fallbacks: ['openai/gpt-4o-mini'],
      max_tokens: 2048,
      default_max_tokens: 512,
      department_overridable: true,
    },
    { task_type: 'classification', model: 'openai/gpt-4o-mini', fallbacks: [], max_tokens: 16, cache: { enabled: true, ttl_seconds: 3600 } },
    {
      task_type: 'analysis',
      model: 'anthropic/claude-3.5-sonnet',
      fallbacks: ['openai/gpt-4o', 'openai/gpt-4o-mini'],
      cache: { enabled: false },
      department_overridable: true,
    },
  ],
  allowed_models: null,
  department_overrides: [
    { department_id: SALES, task_type: 'code', model: 'openai/gpt-4o', max_tokens: 256 },
    { department_id: LAB, task_type: 'analysis', fallbacks: [], cache: { enabled: true, ttl_seconds: 60 } },
  ],
};

interface Case {
  name: string;
  request: RouteRequest;
  rule: string;
  models: string[];
  maxTokens: number;
  cap: number;
  cache?: { enabled: boolean; ttlSeconds?: number };
  override?: string;
  header: string;
}

// Golden scenarios: one row per decision a caller relies on (DEFAULT_MAX_TOKENS = 1024 here).
const CASES: Case[] = [
  {
    name: 'no task type → the default rule',
    request: {},
    rule: 'general',
    models: ['openai/gpt-4o-mini'],
    maxTokens: 1024,
    cap: 1024,
    header: 'task_type=general; rule=general; version=7',
  },
  {
    name: 'unknown task type → the default rule, the asked name kept',
    request: { taskType: 'poetry' },
    rule: 'general',
    models: ['openai/gpt-4o-mini'],
    maxTokens: 1024,
    cap: 1024,
    header: 'task_type=poetry; rule=general; version=7',
  },
  {
    name: 'rule with a default below its cap',
    request: { taskType: 'code' },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'a request under the cap keeps its max_tokens',
    request: { taskType: 'code', maxTokens: 100 },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
    maxTokens: 100,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'a request over the cap is lowered to it',
    request: { taskType: 'code', maxTokens: 9000 },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
    maxTokens: 2048,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'cache policy with TTL',
    request: { taskType: 'classification' },
    rule: 'classification',
    models: ['openai/gpt-4o-mini'],
    maxTokens: 16,
    cap: 16,
    cache: { enabled: true, ttlSeconds: 3600 },
    header: 'task_type=classification; rule=classification; version=7',
  },
  {
    name: 'cache explicitly off',
    request: { taskType: 'analysis' },
    rule: 'analysis',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o', 'openai/gpt-4o-mini'],
    maxTokens: 1024,
    cap: 1024,
    cache: { enabled: false },
    header: 'task_type=analysis; rule=analysis; version=7',
  },
  {
    name: '"auto" is the same as no model',
    request: { taskType: 'code', model: 'auto' },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: "explicit model first, then the rule's fallbacks",
    request: { taskType: 'code', model: 'openai/gpt-4o' },
    rule: 'code',
    models: ['openai/gpt-4o', 'openai/gpt-4o-mini'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'explicit model equal to a fallback is not tried twice',
    request: { taskType: 'code', model: 'openai/gpt-4o-mini' },
    rule: 'code',
    models: ['openai/gpt-4o-mini'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: "request models replace the rule's fallbacks",
    request: { taskType: 'code', models: ['mistralai/mistral-7b-instruct'] },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'mistralai/mistral-7b-instruct'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'department override: model and cap, fallbacks inherited',
    request: { taskType: 'code', departmentId: SALES },
    rule: 'code',
    models: ['openai/gpt-4o', 'openai/gpt-4o-mini'],
    maxTokens: 256,
    cap: 256,
    override: SALES,
    header: 'task_type=code; rule=code; version=7; override=department',
  },
  {
    name: 'department override reaches a request over the override cap',
    request: { taskType: 'code', departmentId: SALES, maxTokens: 4000 },
    rule: 'code',
    models: ['openai/gpt-4o', 'openai/gpt-4o-mini'],
    maxTokens: 256,
    cap: 256,
    override: SALES,
    header: 'task_type=code; rule=code; version=7; override=department',
  },
  {
    name: 'department override of fallbacks and cache only',
    request: { taskType: 'analysis', departmentId: LAB },
    rule: 'analysis',
    models: ['anthropic/claude-3.5-sonnet'],
    maxTokens: 1024,
    cap: 1024,
    cache: { enabled: true, ttlSeconds: 60 },
    override: LAB,
    header: 'task_type=analysis; rule=analysis; version=7; override=department',
  },
  {
    name: 'another department gets the plain rule',
    request: { taskType: 'code', departmentId: LAB },
    rule: 'code',
    models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
    maxTokens: 512,
    cap: 2048,
    header: 'task_type=code; rule=code; version=7',
  },
  {
    name: 'an override never leaks to a task type it does not name',
    request: { taskType: 'general', departmentId: SALES },
    rule: 'general',
    models: ['openai/gpt-4o-mini'],
    maxTokens: 1024,
    cap: 1024,
    header: 'task_type=general; rule=general; version=7',
  },
];

describe('resolveRoute (golden table)', () => {
  const compiled = compileTable(TABLE, 1024);

  it.each(CASES)('$name', (c) => {
    const route = resolveRoute(compiled, c.request);
    expect(route.ruleTaskType).toBe(c.rule);
    expect(route.models).toEqual(c.models);
    expect(route.maxTokens).toBe(c.maxTokens);
    expect(route.maxTokensCap).toBe(c.cap);
    expect(route.cache).toEqual(c.cache);
    expect(route.overrideDepartmentId).toBe(c.override);
    expect(route.version).toBe(7);
    expect(routeHeader(route)).toBe(c.header);
  });

  it('hands out a fresh models array each time (a caller mutating it cannot poison the snapshot)', () => {
    const a = resolveRoute(compiled, { taskType: 'code' });
    a.models.push('evil/model');
    expect(resolveRoute(compiled, { taskType: 'code' }).models).toEqual(['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini']);
  });

  it('refuses models outside allowed_models, naming the field', () => {
    const restricted = compileTable({ ...TABLE, allowed_models: ['openai/gpt-4o-mini', 'openai/gpt-4o'] }, 1024);
    expect(resolveRoute(restricted, { model: 'openai/gpt-4o' }).models[0]).toBe('openai/gpt-4o');
    const named = (() => {
      try {
        resolveRoute(restricted, { model: 'anthropic/claude-3.5-sonnet' });
      } catch (e) {
        return e;
      }
    })();
    expect(named).toBeInstanceOf(GatewayError);
    expect(named).toMatchObject({ code: 'model_not_allowed', param: 'model' });
    expect(() => resolveRoute(restricted, { models: ['x/y'] })).toThrow(expect.objectContaining({ param: 'models' }) as Error);
    // "auto" is always allowed: the table's own choice is not the caller naming a model.
    expect(resolveRoute(restricted, { taskType: 'code' }).models[0]).toBe('anthropic/claude-3.5-sonnet');
  });

  it('says that only auto is left when allowed_models is empty', () => {
    const none = compileTable({ ...TABLE, allowed_models: [] }, 1024);
    expect(() => resolveRoute(none, { model: 'openai/gpt-4o' })).toThrow("Model 'openai/gpt-4o' is not allowed here; use only 'auto' (the routing table allows no model by name).");
    expect(resolveRoute(none, { taskType: 'code' }).models[0]).toBe('anthropic/claude-3.5-sonnet');
  });

  it('ignores an override whose rule is no longer overridable', () => {
    const locked = compileTable({ ...TABLE, rules: TABLE.rules.map((r) => ({ ...r, department_overridable: false })) }, 1024);
    expect(resolveRoute(locked, { taskType: 'code', departmentId: SALES }).models[0]).toBe('anthropic/claude-3.5-sonnet');
  });

  it('resolves the seeded reference table as API.md lists it', () => {
    const seed = compileTable({ ...SEED_ROUTING_TABLE, version: 1, updated_at: '', updated_by: 'system' }, 1024);
    const chains = Object.fromEntries(['classification', 'code', 'analysis', 'general', 'budget'].map((t) => [t, resolveRoute(seed, { taskType: t }).models]));
    expect(chains).toEqual({
      classification: ['openai/gpt-4o-mini'],
      code: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
      analysis: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o-mini'],
      general: ['openai/gpt-4o-mini'],
      budget: ['meta-llama/llama-3.1-8b-instruct', 'openai/gpt-4o-mini'],
    });
    expect(resolveRoute(seed, {}).maxTokens).toBe(1024);
  });
});
