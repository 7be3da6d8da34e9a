import { MAX_CACHE_TTL_SECONDS } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { isUuid } from '../core/validate.js';
import { type DepartmentOverride, MODEL_ID_PATTERN, type RoutingRule, type RoutingTableBody, type RuleCachePolicy, TASK_TYPE_PATTERN } from './routing-table.js';

/**
 * Checks a whole routing table and reports every problem at once (issue #4): an admin fixing a
 * 40-rule table should not discover mistakes one 400 at a time. Pure functions, no Nest, so the
 * same checks run on PUT, on department updates and in unit tests.
 */
export interface RoutingProblem {
  /** Where, as a path into the body: `rules[2].fallbacks[0]`. */
  param: string;
  message: string;
}

export const MAX_RULES = 200;
export const MAX_FALLBACKS = 10;
export const MAX_TOKENS_LIMIT = 1_000_000;
/** Problems listed in one answer: a table of 100,000 bad rules must not answer with megabytes. */
const MAX_LISTED_PROBLEMS = 100;

const TABLE_KEYS = new Set(['default_task_type', 'rules', 'allowed_models', 'department_overrides']);
/** Fields a client may send back unchanged from a GET: accepted and ignored, never stored. */
const READ_ONLY_KEYS = new Set(['updated_at', 'updated_by', 'based_on', 'restored_from']);
const RULE_KEYS = new Set(['task_type', 'model', 'fallbacks', 'max_tokens', 'default_max_tokens', 'cache', 'department_overridable']);
const OVERRIDE_KEYS = new Set(['department_id', 'task_type', 'model', 'fallbacks', 'max_tokens', 'default_max_tokens', 'cache']);
const CACHE_KEYS = new Set(['enabled', 'ttl_seconds']);

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

class Problems {
  readonly list: RoutingProblem[] = [];
  add(param: string, message: string): void {
    this.list.push({ param, message });
  }
  unknownKeys(obj: Obj, allowed: Set<string>, at: string, alsoAllowed?: Set<string>): void {
    for (const key of Object.keys(obj)) {
      if (!allowed.has(key) && !alsoAllowed?.has(key)) this.add(at === '' ? key : `${at}.${key}`, `unknown field '${key}'`);
    }
  }
}

function modelId(value: unknown, at: string, p: Problems): string | undefined {
  if (typeof value !== 'string' || !MODEL_ID_PATTERN.test(value)) {
    p.add(at, 'must be a model id such as "openai/gpt-4o-mini" (1-200 printable ASCII characters, no spaces)');
    return undefined;
  }
  if (value === 'auto') {
    p.add(at, '"auto" means "let the table decide" and cannot be a rule\'s model');
    return undefined;
  }
  return value;
}

function tokens(value: unknown, at: string, p: Problems): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    p.add(at, 'must be an integer');
    return undefined;
  }
  if (value <= 0) {
    p.add(at, `must be greater than 0, got ${value}`);
    return undefined;
  }
  if (value > MAX_TOKENS_LIMIT) {
    p.add(at, `must be at most ${MAX_TOKENS_LIMIT}`);
    return undefined;
  }
  return value;
}

function cachePolicy(value: unknown, at: string, p: Problems): RuleCachePolicy | undefined {
  if (value === undefined) return undefined;
  if (!isObj(value)) {
    p.add(at, 'must be an object { "enabled": boolean, "ttl_seconds"?: integer }');
    return undefined;
  }
  p.unknownKeys(value, CACHE_KEYS, at);
  let ok = true;
  if (typeof value.enabled !== 'boolean') {
    p.add(`${at}.enabled`, 'is required and must be a boolean');
    ok = false;
  }
  const ttl = value.ttl_seconds;
  if (ttl !== undefined && (typeof ttl !== 'number' || !Number.isInteger(ttl) || ttl <= 0 || ttl > MAX_CACHE_TTL_SECONDS)) {
    p.add(`${at}.ttl_seconds`, `must be an integer from 1 to ${MAX_CACHE_TTL_SECONDS}`);
    ok = false;
  }
  if (!ok) return undefined;
  return ttl === undefined ? { enabled: value.enabled as boolean } : { enabled: value.enabled as boolean, ttl_seconds: ttl as number };
}

/** A chain that returns to a model it already tried would only burn attempts: a fallback cycle. */
function chain(primary: string | undefined, fallbacksRaw: unknown, at: string, p: Problems, primaryAt: string): string[] | undefined {
  if (fallbacksRaw === undefined) return [];
  if (!Array.isArray(fallbacksRaw)) {
    p.add(`${at}.fallbacks`, 'must be an array of model ids');
    return undefined;
  }
  if (fallbacksRaw.length > MAX_FALLBACKS) {
    p.add(`${at}.fallbacks`, `must list at most ${MAX_FALLBACKS} models`);
    return undefined;
  }
  const seen = new Map<string, string>();
  if (primary !== undefined) seen.set(primary, primaryAt);
  const out: string[] = [];
  fallbacksRaw.forEach((raw, i) => {
    const where = `${at}.fallbacks[${i}]`;
    const id = modelId(raw, where, p);
    if (id === undefined) return;
    const earlier = seen.get(id);
    if (earlier !== undefined) p.add(where, `'${id}' is already in the chain at ${earlier} (fallback cycle)`);
    else seen.set(id, where);
    out.push(id);
  });
  return out;
}

function defaultWithinCap(defaultMax: number | undefined, cap: number | undefined, at: string, p: Problems): void {
  if (defaultMax !== undefined && cap !== undefined && defaultMax > cap) {
    p.add(`${at}.default_max_tokens`, `must not exceed the cap max_tokens (${cap}), got ${defaultMax}`);
  }
}

function parseRule(raw: unknown, i: number, p: Problems): RoutingRule | undefined {
  const at = `rules[${i}]`;
  if (!isObj(raw)) {
    p.add(at, 'must be an object');
    return undefined;
  }
  p.unknownKeys(raw, RULE_KEYS, at);
  let taskType: string | undefined;
  if (typeof raw.task_type !== 'string' || !TASK_TYPE_PATTERN.test(raw.task_type)) {
    p.add(`${at}.task_type`, 'is required: a name such as "code" (letters, digits, _ . -; at most 64)');
  } else {
    taskType = raw.task_type;
  }
  let model: string | undefined;
  if (raw.model === undefined || raw.model === null || raw.model === '') {
    p.add(`${at}.model`, 'is required: a rule needs at least one model (empty model list)');
  } else {
    model = modelId(raw.model, `${at}.model`, p);
  }
  const fallbacks = chain(model, raw.fallbacks, at, p, `${at}.model`);
  const cap = tokens(raw.max_tokens, `${at}.max_tokens`, p);
  const defaultMax = tokens(raw.default_max_tokens, `${at}.default_max_tokens`, p);
  defaultWithinCap(defaultMax, cap, at, p);
  const cache = cachePolicy(raw.cache, `${at}.cache`, p);
  const overridable = raw.department_overridable;
  if (overridable !== undefined && typeof overridable !== 'boolean') p.add(`${at}.department_overridable`, 'must be a boolean');
  if (taskType === undefined || model === undefined || fallbacks === undefined) return undefined;
  const rule: RoutingRule = { task_type: taskType, model, fallbacks };
  if (cap !== undefined) rule.max_tokens = cap;
  if (defaultMax !== undefined) rule.default_max_tokens = defaultMax;
  if (cache !== undefined) rule.cache = cache;
  if (overridable === true) rule.department_overridable = true;
  return rule;
}

function parseOverride(raw: unknown, at: string, rules: Map<string, RoutingRule>, p: Problems): DepartmentOverride | undefined {
  if (!isObj(raw)) {
    p.add(at, 'must be an object');
    return undefined;
  }
  p.unknownKeys(raw, OVERRIDE_KEYS, at);
  let departmentId: string | undefined;
  if (typeof raw.department_id !== 'string' || !isUuid(raw.department_id)) p.add(`${at}.department_id`, 'is required and must be a department id (UUID)');
  else departmentId = raw.department_id.toLowerCase();
  let rule: RoutingRule | undefined;
  if (typeof raw.task_type !== 'string' || !TASK_TYPE_PATTERN.test(raw.task_type)) {
    p.add(`${at}.task_type`, 'is required: the task type of the rule to override');
  } else {
    rule = rules.get(raw.task_type);
    if (!rule) p.add(`${at}.task_type`, `no rule has task_type '${raw.task_type}'`);
    else if (!rule.department_overridable)
      p.add(`${at}.task_type`, `the rule '${raw.task_type}' does not allow department overrides (department_overridable is not true)`);
  }
  const changes = ['model', 'fallbacks', 'max_tokens', 'default_max_tokens', 'cache'].filter((k) => raw[k] !== undefined);
  if (changes.length === 0) p.add(at, 'overrides nothing: set at least one of model, fallbacks, max_tokens, default_max_tokens, cache');
  let model: string | undefined;
  if (raw.model !== undefined) model = modelId(raw.model, `${at}.model`, p);
  // The effective chain is what must be free of cycles: an inherited fallback counts too.
  const effectiveModel = model ?? rule?.model;
  const fallbacks =
    raw.fallbacks === undefined ? undefined : chain(effectiveModel, raw.fallbacks, at, p, model !== undefined ? `${at}.model` : "the rule's model");
  // A new model with the rule's own fallbacks: that chain must be free of cycles too (the model
  // among them would leave the department with a shorter chain, or none, without a word).
  if (raw.fallbacks === undefined && model !== undefined && rule !== undefined && rule.fallbacks.includes(model)) {
    p.add(
      `${at}.model`,
      `'${model}' is also one of the fallbacks this override inherits from the rule '${rule.task_type}' (fallback cycle): give the override fallbacks of its own`,
    );
  }
  const fallbacksOk = raw.fallbacks === undefined || fallbacks !== undefined;
  const cap = tokens(raw.max_tokens, `${at}.max_tokens`, p);
  const defaultMax = tokens(raw.default_max_tokens, `${at}.default_max_tokens`, p);
  defaultWithinCap(defaultMax, cap ?? rule?.max_tokens, at, p);
  const cache = cachePolicy(raw.cache, `${at}.cache`, p);
  if (departmentId === undefined || rule === undefined || !fallbacksOk) return undefined;
  const override: DepartmentOverride = { department_id: departmentId, task_type: rule.task_type };
  if (model !== undefined) override.model = model;
  if (fallbacks !== undefined) override.fallbacks = fallbacks;
  if (cap !== undefined) override.max_tokens = cap;
  if (defaultMax !== undefined) override.default_max_tokens = defaultMax;
  if (cache !== undefined) override.cache = cache;
  return override;
}

/**
 * Parses the department overrides against a table's rules (also used on their own by
 * `PUT /admin/routing/departments/{id}`), reporting problems with the given path prefix.
 */
export function parseOverrides(raw: unknown, rules: RoutingRule[], at: string): { overrides: DepartmentOverride[]; problems: RoutingProblem[] } {
  const p = new Problems();
  const overrides = overridesInto(raw, new Map(rules.map((r) => [r.task_type, r])), p, at);
  return { overrides, problems: p.list };
}

function overridesInto(raw: unknown, rules: Map<string, RoutingRule>, p: Problems, at = 'department_overrides'): DepartmentOverride[] {
  if (raw === undefined || raw === null) return [];
  if (!Array.isArray(raw)) {
    p.add(at, 'must be an array of { department_id, task_type, … }');
    return [];
  }
  const out: DepartmentOverride[] = [];
  const seen = new Set<string>();
  raw.forEach((o, i) => {
    const parsed = parseOverride(o, `${at}[${i}]`, rules, p);
    if (!parsed) return;
    const key = `${parsed.department_id}/${parsed.task_type}`;
    if (seen.has(key)) p.add(`${at}[${i}]`, `department ${parsed.department_id} already overrides '${parsed.task_type}'`);
    seen.add(key);
    out.push(parsed);
  });
  return out;
}

/**
 * Validates a table body. `extraKeys` are top-level fields the caller handles itself (`version`,
 * `comment` on PUT). Returns the normalised body only when there is no problem at all.
 */
export function parseRoutingTableBody(
  raw: unknown,
  extraKeys: ReadonlySet<string> = new Set(),
): { body: RoutingTableBody | undefined; problems: RoutingProblem[] } {
  const p = new Problems();
  if (!isObj(raw)) {
    p.add('', 'the routing table must be a JSON object');
    return { body: undefined, problems: p.list };
  }
  p.unknownKeys(raw, TABLE_KEYS, '', new Set([...READ_ONLY_KEYS, ...extraKeys]));

  const rules: RoutingRule[] = [];
  const byTaskType = new Map<string, RoutingRule>();
  if (!Array.isArray(raw.rules) || raw.rules.length === 0) {
    p.add('rules', 'is required: a non-empty array of rules');
  } else {
    // Past the limit the rules are not read one by one: that table is refused whatever they hold.
    if (raw.rules.length > MAX_RULES) p.add('rules', `must hold at most ${MAX_RULES} rules`);
    const names = new Set<string>();
    (raw.rules.length > MAX_RULES ? [] : raw.rules).forEach((r, i) => {
      const rule = parseRule(r, i, p);
      // Duplicates count even when the other rule had problems of its own.
      const name = isObj(r) && typeof r.task_type === 'string' ? r.task_type : undefined;
      if (name !== undefined && names.has(name)) p.add(`rules[${i}].task_type`, `'${name}' has more than one rule`);
      if (name !== undefined) names.add(name);
      if (!rule) return;
      if (!byTaskType.has(rule.task_type)) byTaskType.set(rule.task_type, rule);
      rules.push(rule);
    });
  }

  let defaultTaskType: string | undefined;
  if (typeof raw.default_task_type !== 'string' || raw.default_task_type === '') {
    p.add('default_task_type', 'is required: the task type of the default rule (used for unknown task types)');
  } else if (Array.isArray(raw.rules) && !byTaskType.has(raw.default_task_type) && !ruleNamed(raw.rules, raw.default_task_type)) {
    p.add('default_task_type', `no rule has task_type '${raw.default_task_type}': the table has no default rule`);
  } else {
    defaultTaskType = raw.default_task_type;
  }

  let allowed: string[] | null = null;
  if (raw.allowed_models !== undefined && raw.allowed_models !== null) {
    if (!Array.isArray(raw.allowed_models)) p.add('allowed_models', 'must be null or an array of model ids');
    else allowed = raw.allowed_models.map((m, i) => modelId(m, `allowed_models[${i}]`, p)).filter((m): m is string => m !== undefined);
  }

  const overrides = overridesInto(raw.department_overrides, byTaskType, p);

  if (p.list.length > 0 || defaultTaskType === undefined) return { body: undefined, problems: p.list };
  const body: RoutingTableBody = { default_task_type: defaultTaskType, rules, allowed_models: allowed };
  if (overrides.length > 0) body.department_overrides = overrides;
  return { body, problems: [] };
}

/**
 * default_max_tokens above the cap that applies when the rule (or override) sets none: this
 * gateway's DEFAULT_MAX_TOKENS. The table's own checks cannot see that cap (it is configuration);
 * without this the value was stored and quietly lowered to the cap on every call.
 */
export function implicitCapProblems(body: RoutingTableBody, implicitCap: number): RoutingProblem[] {
  const problems: RoutingProblem[] = [];
  const above = (value: number | undefined) => value !== undefined && value > implicitCap;
  const message = (value: number) => `${value} is above the cap of ${implicitCap} (DEFAULT_MAX_TOKENS) that applies without max_tokens: set max_tokens, or a lower default`;
  const rules = new Map(body.rules.map((r) => [r.task_type, r]));
  body.rules.forEach((rule, i) => {
    if (rule.max_tokens === undefined && above(rule.default_max_tokens)) problems.push({ param: `rules[${i}].default_max_tokens`, message: message(rule.default_max_tokens as number) });
  });
  (body.department_overrides ?? []).forEach((o, i) => {
    if (o.max_tokens === undefined && rules.get(o.task_type)?.max_tokens === undefined && above(o.default_max_tokens)) {
      problems.push({ param: `department_overrides[${i}].default_max_tokens`, message: message(o.default_max_tokens as number) });
    }
  });
  return problems;
}

/** A default naming a rule that itself had problems is reported once, on the rule, not twice. */
function ruleNamed(rules: unknown[], taskType: string): boolean {
  return rules.some((r) => isObj(r) && r.task_type === taskType);
}

export function describeProblems(problems: RoutingProblem[]): string {
  const listed = problems.slice(0, MAX_LISTED_PROBLEMS);
  const lines = listed.map((x) => (x.param === '' ? x.message : `${x.param}: ${x.message}`));
  const more = problems.length - listed.length;
  const tail = more > 0 ? `; and ${more} more` : '';
  return `The routing table has ${problems.length} problem${problems.length === 1 ? '' : 's'}; nothing was saved: ${lines.join('; ')}${tail}.`;
}

/**
 * One 400 listing every problem, up to MAX_LISTED_PROBLEMS: in the message for humans, in
 * `problems` for tools (`problems_not_listed` says how many more there were).
 */
export function invalidTable(problems: RoutingProblem[]): GatewayError {
  const listed = problems.slice(0, MAX_LISTED_PROBLEMS);
  const details: Record<string, unknown> = { problems: listed };
  if (problems.length > listed.length) details.problems_not_listed = problems.length - listed.length;
  return new GatewayError('invalid_value', describeProblems(problems), { param: problems[0]?.param || null, details });
}
