/** The routing table as admins see it (API.md) and as every instance holds it in memory. */

/** Response cache policy of a rule; the cache stage reads it from `ResolvedRoute.cache`. */
export interface RuleCachePolicy {
  enabled: boolean;
  /** Seconds a cached answer lives; absent = the gateway's CACHE_TTL_SECONDS. */
  ttl_seconds?: number;
}

export interface RoutingRule {
  task_type: string;
  model: string;
  /** Tried in order after `model`, before the first byte reaches the client. */
  fallbacks: string[];
  /** Cap on max_tokens: a larger request is lowered to it. Absent = DEFAULT_MAX_TOKENS. */
  max_tokens?: number;
  /** Sent (and reserved for) when the request names no max_tokens. Absent = the cap. */
  default_max_tokens?: number;
  cache?: RuleCachePolicy;
  /** true = a department may replace model, fallbacks, caps or cache policy for this task type. */
  department_overridable?: boolean;
}

/** One department's replacement for parts of one overridable rule; absent fields inherit. */
export interface DepartmentOverride {
  department_id: string;
  task_type: string;
  model?: string;
  fallbacks?: string[];
  max_tokens?: number;
  default_max_tokens?: number;
  cache?: RuleCachePolicy;
}

export interface RoutingTableBody {
  default_task_type: string;
  rules: RoutingRule[];
  /** When set, users may name only these models explicitly (and `auto`). */
  allowed_models?: string[] | null;
  /**
   * Kept inside the versioned table on purpose: a department's change gets a version, an author
   * and a rollback like any other change, and reaches every instance by the same poll.
   */
  department_overrides?: DepartmentOverride[];
}

export interface RoutingTable extends RoutingTableBody {
  version: number;
  updated_at: string;
  /** The admin user id that made this version (`system` for the seed). */
  updated_by: string;
  comment?: string | null;
  /** The version this one replaced (null for the seed). */
  based_on?: number | null;
  /** Set when this version is a rollback: the version whose table it restored. */
  restored_from?: number | null;
}

/** Task type names, shared by the request edge and table validation. */
export const TASK_TYPE_PATTERN = /^[a-z0-9][a-z0-9_.-]{0,63}$/i;

/**
 * Model ids: printable ASCII without spaces, 1-200 characters, shared by the request edge and
 * table validation. A name goes upstream and comes back in the `x-gateway-model` header, which
 * can carry nothing else; a table naming a model no request can name would only refuse it.
 */
export const MODEL_ID_PATTERN = /^[\x21-\x7e]{1,200}$/;

/** The reference table of API.md, seeded as version 1 on a first start. */
export const SEED_ROUTING_TABLE: RoutingTableBody = {
  default_task_type: 'general',
  rules: [
    { task_type: 'classification', model: 'openai/gpt-4o-mini', fallbacks: [] },
    { task_type: 'code', model: 'anthropic/claude-3.5-sonnet', fallbacks: ['openai/gpt-4o-mini'] },
    { task_type: 'analysis', model: 'anthropic/claude-3.5-sonnet', fallbacks: ['openai/gpt-4o-mini'] },
    { task_type: 'general', model: 'openai/gpt-4o-mini', fallbacks: [] },
    { task_type: 'budget', model: 'meta-llama/llama-3.1-8b-instruct', fallbacks: ['openai/gpt-4o-mini'] },
  ],
  allowed_models: null,
};

/** What a request gets: the decision is data, so the dry-run endpoint and real calls share it. */
export interface ResolvedRoute {
  /** The task type the caller asked for (or the default when none). */
  requestedTaskType: string;
  /** The rule actually used (the default rule when the task type is unknown). */
  ruleTaskType: string;
  version: number;
  /** Primary first, then fallbacks, without duplicates. */
  models: string[];
  /** The max_tokens to send upstream (and to reserve budget for). */
  maxTokens: number;
  /** true when the caller named a concrete model instead of `auto`. */
  explicitModel: boolean;
  /** true when the caller named the fallbacks too (`models`); otherwise they are the rule's. */
  callerFallbacks?: boolean;
  /** The rule's cap on max_tokens (maxTokens never exceeds it). */
  maxTokensCap?: number;
  /** The rule's cache policy; undefined = the rule sets none and the cache's defaults apply. */
  cache?: { enabled: boolean; ttlSeconds?: number };
  /** Set when a department override shaped this route. */
  overrideDepartmentId?: string;
}

export function routeHeader(route: ResolvedRoute): string {
  const base = `task_type=${route.requestedTaskType}; rule=${route.ruleTaskType}; version=${route.version}`;
  return route.overrideDepartmentId === undefined ? base : `${base}; override=department`;
}
