/** The routing table as admins see it (API.md) and as every instance holds it in memory. */
export interface RoutingRule {
  task_type: string;
  model: string;
  fallbacks: string[];
  /** Cap on max_tokens and the value sent when the request names none. */
  max_tokens?: number;
}

export interface RoutingTableBody {
  default_task_type: string;
  rules: RoutingRule[];
  /** When set, users may name only these models explicitly (and `auto`). */
  allowed_models?: string[] | null;
}

export interface RoutingTable extends RoutingTableBody {
  version: number;
  updated_at: string;
  updated_by: string;
  comment?: string | null;
}

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
}

export function routeHeader(route: ResolvedRoute): string {
  return `task_type=${route.requestedTaskType}; rule=${route.ruleTaskType}; version=${route.version}`;
}
