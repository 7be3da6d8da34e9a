import { GatewayError } from '../core/errors.js';
import type { DepartmentOverride, ResolvedRoute, RoutingRule, RoutingTable, RuleCachePolicy } from './routing-table.js';

export interface RouteRequest {
  taskType?: string;
  /** `auto`/undefined = let the table decide. */
  model?: string;
  /** OpenRouter-style explicit fallback list. */
  models?: string[];
  maxTokens?: number;
  /** The caller's department (from the key), for department overrides. */
  departmentId?: string;
}

/** A rule with everything a request needs precomputed, so resolving allocates almost nothing. */
interface CompiledRule {
  taskType: string;
  models: readonly string[];
  cap: number;
  defaultMaxTokens: number;
  cache: ResolvedRoute['cache'];
  overrideDepartmentId: string | undefined;
}

/** One table version, indexed for the hot path. Built once per version, never per request. */
export interface CompiledTable {
  readonly table: RoutingTable;
  readonly rules: ReadonlyMap<string, CompiledRule>;
  readonly defaultRule: CompiledRule | undefined;
  /** department id → rule task type → merged rule. */
  readonly overrides: ReadonlyMap<string, ReadonlyMap<string, CompiledRule>>;
  readonly allowed: ReadonlySet<string> | null;
}

function cacheOf(policy: RuleCachePolicy | undefined): ResolvedRoute['cache'] {
  if (!policy) return undefined;
  return policy.ttl_seconds === undefined ? { enabled: policy.enabled } : { enabled: policy.enabled, ttlSeconds: policy.ttl_seconds };
}

function compileRule(rule: RoutingRule, defaultMaxTokens: number): CompiledRule {
  const cap = rule.max_tokens ?? defaultMaxTokens;
  return {
    taskType: rule.task_type,
    models: Object.freeze([...new Set([rule.model, ...rule.fallbacks])]),
    cap,
    defaultMaxTokens: Math.min(rule.default_max_tokens ?? cap, cap),
    cache: cacheOf(rule.cache),
    overrideDepartmentId: undefined,
  };
}

/** Absent override fields inherit from the rule; a new primary keeps the rule's other fallbacks. */
function compileOverride(rule: RoutingRule, o: DepartmentOverride, defaultMaxTokens: number): CompiledRule {
  const model = o.model ?? rule.model;
  const fallbacks = o.fallbacks ?? rule.fallbacks;
  const cap = o.max_tokens ?? rule.max_tokens ?? defaultMaxTokens;
  const requestedDefault = o.default_max_tokens ?? rule.default_max_tokens ?? cap;
  return {
    taskType: rule.task_type,
    models: Object.freeze([...new Set([model, ...fallbacks])]),
    cap,
    defaultMaxTokens: Math.min(requestedDefault, cap),
    cache: cacheOf(o.cache ?? rule.cache),
    overrideDepartmentId: o.department_id,
  };
}

export function compileTable(table: RoutingTable, defaultMaxTokens: number): CompiledTable {
  const rules = new Map<string, CompiledRule>();
  const raw = new Map<string, RoutingRule>();
  for (const rule of table.rules) {
    rules.set(rule.task_type, compileRule(rule, defaultMaxTokens));
    raw.set(rule.task_type, rule);
  }
  const overrides = new Map<string, Map<string, CompiledRule>>();
  for (const o of table.department_overrides ?? []) {
    const rule = raw.get(o.task_type);
    // A stored table was validated on write; a rule that lost its permission simply stops applying.
    if (!rule?.department_overridable) continue;
    let forDepartment = overrides.get(o.department_id);
    if (!forDepartment) overrides.set(o.department_id, (forDepartment = new Map<string, CompiledRule>()));
    forDepartment.set(o.task_type, compileOverride(rule, o, defaultMaxTokens));
  }
  return {
    table,
    rules,
    defaultRule: rules.get(table.default_task_type),
    overrides,
    allowed: table.allowed_models ? new Set(table.allowed_models) : null,
  };
}

/**
 * The routing decision, pure: requests and `POST /admin/routing/resolve` both call this, with
 * the same snapshot, so the dry run cannot drift from what a request really gets.
 */
export function resolveRoute(compiled: CompiledTable, request: RouteRequest): ResolvedRoute {
  const { table } = compiled;
  const requestedTaskType = request.taskType ?? table.default_task_type;
  const base = compiled.rules.get(requestedTaskType) ?? compiled.defaultRule;
  if (!base) throw new GatewayError('internal_error', 'The routing table has no default rule.');
  const rule = (request.departmentId === undefined ? undefined : compiled.overrides.get(request.departmentId)?.get(base.taskType)) ?? base;

  const explicitModel = request.model !== undefined && request.model !== 'auto';
  if (compiled.allowed) {
    const named = explicitModel ? [request.model as string, ...(request.models ?? [])] : (request.models ?? []);
    const refused = named.find((m) => !compiled.allowed?.has(m));
    if (refused !== undefined) {
      const choices = compiled.allowed.size === 0 ? "only 'auto' (the routing table allows no model by name)" : `'auto' or one of: ${[...compiled.allowed].join(', ')}`;
      throw new GatewayError('model_not_allowed', `Model '${refused}' is not allowed here; use ${choices}.`, {
        param: refused === request.model ? 'model' : 'models',
      });
    }
  }
  let models: string[];
  if (!explicitModel && request.models === undefined) models = rule.models.slice();
  else models = [...new Set([explicitModel ? (request.model as string) : rule.models[0], ...(request.models ?? rule.models.slice(1))])];

  const maxTokens = request.maxTokens === undefined ? rule.defaultMaxTokens : Math.min(request.maxTokens, rule.cap);
  const route: ResolvedRoute = {
    requestedTaskType,
    ruleTaskType: rule.taskType,
    version: table.version,
    models,
    maxTokens,
    explicitModel,
    maxTokensCap: rule.cap,
    cache: rule.cache,
  };
  if (rule.overrideDepartmentId !== undefined) route.overrideDepartmentId = rule.overrideDepartmentId;
  if (request.models !== undefined) route.callerFallbacks = true;
  return route;
}
