import { describe, expect, it } from 'vitest';
import { SEED_ROUTING_TABLE } from './routing-table.js';
import { describeProblems, implicitCapProblems, invalidTable, parseOverrides, parseRoutingTableBody } from './routing-validation.js';

const DEPT = '11111111-1111-4111-8111-111111111111';
const DEPT2 = '22222222-2222-4222-8222-222222222222';
const DEPT3 = '33333333-3333-4333-8333-333333333333';
const DEPT4 = '44444444-4444-4444-8444-444444444444';

function params(raw: unknown): string[] {
  return parseRoutingTableBody(raw).problems.map((p) => p.param);
}

describe('parseRoutingTableBody', () => {
  it('accepts the seeded reference table unchanged', () => {
    const { body, problems } = parseRoutingTableBody(SEED_ROUTING_TABLE);
    expect(problems).toEqual([]);
    expect(body).toEqual(SEED_ROUTING_TABLE);
  });

  it('lists every problem of the issue at once: unknown field, empty model list, fallback cycle, cap ≤ 0, missing default', () => {
    const { body, problems } = parseRoutingTableBody({
      default_task_type: 'general',
      colour: 'blue',
      rules: [
        { task_type: 'code', model: 'a/one', fallbacks: ['b/two', 'a/one'], max_tokens: 0, priority: 3 },
        { task_type: 'chat', model: '', fallbacks: [] },
        { task_type: 'loop', model: 'x/y', fallbacks: ['z/w', 'z/w'], default_max_tokens: -5 },
      ],
    });
    expect(body).toBeUndefined();
    expect(problems.map((p) => p.param)).toEqual([
      'colour',
      'rules[0].priority',
      'rules[0].fallbacks[1]',
      'rules[0].max_tokens',
      'rules[1].model',
      'rules[2].fallbacks[1]',
      'rules[2].default_max_tokens',
      'default_task_type',
    ]);
    const text = describeProblems(problems);
    expect(text).toContain('8 problems');
    expect(text).toContain("unknown field 'colour'");
    expect(text).toContain('fallback cycle');
    expect(text).toContain('empty model list');
    expect(text).toContain('must be greater than 0, got 0');
    expect(text).toContain('no default rule');
  });

  it('requires rules, a default, and well-formed values', () => {
    expect(params({})).toEqual(['rules', 'default_task_type']);
    expect(params({ default_task_type: 'g', rules: [] })).toEqual(['rules', 'default_task_type']);
    expect(params('nope')).toEqual(['']);
    expect(
      params({
        default_task_type: 'g',
        rules: [
          { task_type: 'g', model: 'auto', fallbacks: 'x' },
          { task_type: 'bad name!', model: 'has space', fallbacks: [], max_tokens: 1.5, cache: { ttl_seconds: 0, x: 1 }, department_overridable: 'yes' },
          { task_type: 'g', model: 'm/n' },
        ],
        allowed_models: 'all',
      }),
    ).toEqual([
      'rules[0].model',
      'rules[0].fallbacks',
      'rules[1].task_type',
      'rules[1].model',
      'rules[1].max_tokens',
      'rules[1].cache.x',
      'rules[1].cache.enabled',
      'rules[1].cache.ttl_seconds',
      'rules[1].department_overridable',
      'rules[2].task_type',
      'allowed_models',
    ]);
  });

  it('takes only model ids a request can name: printable ASCII without spaces (no NUL, no look-alike letters)', () => {
    const table = (model: string) => ({ default_task_type: 'g', rules: [{ task_type: 'g', model }], allowed_models: [model] });
    for (const bad of ['openai/gpt\u00004o', 'openai/gpt-4\u043e', 'openai/gpt\u200b-4o', 'openai/gpt-\ud8004o']) {
      expect(params(table(bad)), JSON.stringify(bad)).toEqual(['rules[0].model', 'allowed_models[0]']);
    }
    expect(params(table('openai/gpt-4o:free'))).toEqual([]);
  });

  it('answers a table far over the rule limit with that one problem, and lists at most 100 problems of any table', () => {
    const huge = parseRoutingTableBody({ default_task_type: 'g', rules: Array.from({ length: 100_000 }, () => 1) });
    expect(huge.problems.map((p) => p.param)).toEqual(['rules', 'default_task_type']);
    const many = parseRoutingTableBody({ default_task_type: 'g', rules: Array.from({ length: 150 }, (_, i) => ({ task_type: `t${i}`, model: 'has space' })) });
    expect(many.problems.length).toBeGreaterThan(150);
    const error = invalidTable(many.problems);
    const { problems, problems_not_listed } = error.details as { problems: unknown[]; problems_not_listed: number };
    expect(problems).toHaveLength(100);
    expect(problems_not_listed).toBe(many.problems.length - 100);
    expect(error.message).toContain(`has ${many.problems.length} problems`);
    expect(error.message).toContain(`and ${many.problems.length - 100} more.`);
    expect(error.message.length).toBeLessThan(20_000);
  });

  it('holds a default_max_tokens without a cap of its own to the DEFAULT_MAX_TOKENS that caps it', () => {
    const table = {
      default_task_type: 'g',
      rules: [
        { task_type: 'g', model: 'm/a', fallbacks: [], default_max_tokens: 5000 },
        { task_type: 'h', model: 'm/a', fallbacks: [], max_tokens: 8000, default_max_tokens: 5000 },
        { task_type: 'i', model: 'm/a', fallbacks: [], default_max_tokens: 500 },
      ],
      allowed_models: null,
      department_overrides: [
        { department_id: DEPT, task_type: 'i', default_max_tokens: 2000 },
        { department_id: DEPT2, task_type: 'h', default_max_tokens: 2000 },
        { department_id: DEPT3, task_type: 'i', max_tokens: 4000, default_max_tokens: 2000 },
      ],
    };
    expect(implicitCapProblems(table, 1024).map((p) => p.param)).toEqual(['rules[0].default_max_tokens', 'department_overrides[0].default_max_tokens']);
    expect(implicitCapProblems(table, 8000)).toEqual([]);
  });

  it('keeps default_max_tokens within the cap, and ignores the read-only fields GET returns', () => {
    const base = { default_task_type: 'g', updated_at: 'x', updated_by: 'y', based_on: 1, restored_from: null };
    expect(params({ ...base, rules: [{ task_type: 'g', model: 'm/n', fallbacks: [], max_tokens: 100, default_max_tokens: 200 }] })).toEqual([
      'rules[0].default_max_tokens',
    ]);
    const ok = parseRoutingTableBody({
      ...base,
      rules: [{ task_type: 'g', model: 'm/n', max_tokens: 100, default_max_tokens: 50, cache: { enabled: true, ttl_seconds: 60 } }],
    });
    expect(ok.problems).toEqual([]);
    expect(ok.body?.rules[0]).toEqual({
      task_type: 'g',
      model: 'm/n',
      fallbacks: [],
      max_tokens: 100,
      default_max_tokens: 50,
      cache: { enabled: true, ttl_seconds: 60 },
    });
    // version/comment belong to PUT, which passes them as extra keys; elsewhere they are unknown.
    expect(params({ ...base, version: 3, rules: [{ task_type: 'g', model: 'm/n' }] })).toEqual(['version']);
    expect(parseRoutingTableBody({ ...base, version: 3, rules: [{ task_type: 'g', model: 'm/n' }] }, new Set(['version'])).problems).toEqual([]);
  });

  it('checks department overrides against the rules they override', () => {
    const rules = [
      { task_type: 'g', model: 'm/a', fallbacks: ['m/b'], department_overridable: true, max_tokens: 100 },
      { task_type: 'locked', model: 'm/a', fallbacks: [] },
    ];
    const { problems } = parseRoutingTableBody({
      default_task_type: 'g',
      rules,
      department_overrides: [
        { department_id: DEPT, task_type: 'g', model: 'm/c', max_tokens: 50 },
        { department_id: DEPT, task_type: 'g', max_tokens: 10 },
        { department_id: DEPT, task_type: 'locked', model: 'm/z' },
        { department_id: 'not-a-uuid', task_type: 'nope', model: 'm/z' },
        { department_id: DEPT2, task_type: 'g', fallbacks: ['m/a'] },
        { department_id: DEPT3, task_type: 'g' },
        { department_id: DEPT4, task_type: 'g', default_max_tokens: 500, extra: 1 },
      ],
    });
    expect(problems.map((p) => `${p.param}: ${p.message}`)).toEqual([
      `department_overrides[1]: department ${DEPT} already overrides 'g'`,
      "department_overrides[2].task_type: the rule 'locked' does not allow department overrides (department_overridable is not true)",
      'department_overrides[3].department_id: is required and must be a department id (UUID)',
      "department_overrides[3].task_type: no rule has task_type 'nope'",
      "department_overrides[4].fallbacks[0]: 'm/a' is already in the chain at the rule's model (fallback cycle)",
      'department_overrides[5]: overrides nothing: set at least one of model, fallbacks, max_tokens, default_max_tokens, cache',
      "department_overrides[6].extra: unknown field 'extra'",
      'department_overrides[6].default_max_tokens: must not exceed the cap max_tokens (100), got 500',
    ]);
  });

  it("finds a cycle through the fallbacks an override inherits: its model among the rule's fallbacks", () => {
    const rules = [{ task_type: 'g', model: 'm/a', fallbacks: ['m/b'], department_overridable: true }];
    const cycle = {
      param: 'overrides[0].model',
      message: "'m/b' is also one of the fallbacks this override inherits from the rule 'g' (fallback cycle): give the override fallbacks of its own",
    };
    expect(parseOverrides([{ department_id: DEPT, task_type: 'g', model: 'm/b' }], rules, 'overrides').problems).toEqual([cycle]);
    expect(parseOverrides([{ department_id: DEPT, task_type: 'g', model: 'm/b', fallbacks: ['m/a'] }], rules, 'overrides').problems).toEqual([]);
    expect(parseOverrides([{ department_id: DEPT, task_type: 'g', model: 'm/c' }], rules, 'overrides').problems).toEqual([]);
    // A table whose rule gains the override's model as a fallback is refused at the override.
    const table = parseRoutingTableBody({
      default_task_type: 'g',
      rules: [{ task_type: 'g', model: 'm/a', fallbacks: ['m/c', 'm/x'], department_overridable: true }],
      department_overrides: [{ department_id: DEPT, task_type: 'g', model: 'm/x' }],
    });
    expect(table.problems.map((p) => p.param)).toEqual(['department_overrides[0].model']);
  });

  it("parses one department's overrides on their own, with the caller's path prefix", () => {
    const rules = [{ task_type: 'g', model: 'm/a', fallbacks: [], department_overridable: true }];
    expect(parseOverrides([{ department_id: DEPT, task_type: 'g', model: 'm/b' }], rules, 'overrides')).toEqual({
      overrides: [{ department_id: DEPT, task_type: 'g', model: 'm/b' }],
      problems: [],
    });
    expect(parseOverrides([{ department_id: DEPT, task_type: 'g', max_tokens: 0 }], rules, 'overrides').problems).toEqual([
      { param: 'overrides[0].max_tokens', message: 'must be greater than 0, got 0' },
    ]);
  });
});
