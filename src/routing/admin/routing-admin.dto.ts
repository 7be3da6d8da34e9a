import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { GatewayError } from '../../core/errors.js';
import { asBody, type Body, isUuid, optionalNumber, optionalString, requiredNumber } from '../../core/validate.js';
import { parseModelId } from '../../openai-api/chat-request.js';
import { MODEL_ID_PATTERN, type ResolvedRoute, routeHeader, type RoutingTableBody, TASK_TYPE_PATTERN } from '../routing-table.js';
import { invalidTable as invalid, parseRoutingTableBody, type RoutingProblem } from '../routing-validation.js';

// Each DTO documents the wire shape for /docs and parses it, naming every field that is wrong.

const MAX_COMMENT = 500;
// eslint-disable-next-line no-control-regex -- finding control characters is the point
const CONTROL = /[\u0000-\u001f\u007f]/;

/**
 * The largest routing table version: the column is a PostgreSQL `integer`. A version beyond it
 * can only be unknown (a change based on it is stale, a lookup of it finds nothing), and is
 * answered so by the controller, never handed to SQL, where it would fail as out of range.
 */
export const MAX_VERSION = 2_147_483_647;

export class CachePolicyDto {
  @ApiProperty({ description: 'cache answers of this rule' }) enabled!: boolean;
  @ApiPropertyOptional({ minimum: 1, description: 'lifetime of a cached answer; absent = CACHE_TTL_SECONDS' }) ttl_seconds?: number;
}

export class RoutingRuleDto {
  @ApiProperty({ example: 'code', description: 'task type this rule answers; the default rule also answers unknown ones' }) task_type!: string;
  @ApiProperty({ example: 'anthropic/claude-3.5-sonnet', description: 'primary model' }) model!: string;
  @ApiProperty({ type: [String], example: ['openai/gpt-4o-mini'], description: 'tried in order when the primary fails before the first byte; no model twice' })
  fallbacks!: string[];
  @ApiPropertyOptional({ example: 1024, minimum: 1, description: 'cap on max_tokens (a larger request is lowered to it); absent = DEFAULT_MAX_TOKENS' })
  max_tokens?: number;
  @ApiPropertyOptional({ example: 512, minimum: 1, description: 'sent and reserved when the request names no max_tokens; absent = the cap' })
  default_max_tokens?: number;
  @ApiPropertyOptional({ type: CachePolicyDto }) cache?: CachePolicyDto;
  @ApiPropertyOptional({ description: 'departments may override this rule (department_overrides)' }) department_overridable?: boolean;
}

export class DepartmentOverrideDto {
  @ApiProperty({ format: 'uuid', description: 'implied by the path on PUT /admin/routing/departments/{id}' }) department_id!: string;
  @ApiProperty({ example: 'code', description: 'an overridable rule' }) task_type!: string;
  @ApiPropertyOptional({ example: 'openai/gpt-4o' }) model?: string;
  @ApiPropertyOptional({ type: [String] }) fallbacks?: string[];
  @ApiPropertyOptional({ minimum: 1 }) max_tokens?: number;
  @ApiPropertyOptional({ minimum: 1 }) default_max_tokens?: number;
  @ApiPropertyOptional({ type: CachePolicyDto }) cache?: CachePolicyDto;
}

export class RoutingTableDto {
  @ApiProperty({ example: 3 }) version!: number;
  @ApiProperty({ example: 'general' }) default_task_type!: string;
  @ApiProperty({ type: [RoutingRuleDto] }) rules!: RoutingRuleDto[];
  @ApiPropertyOptional({ type: [String], nullable: true, description: 'when set, the only models users may name explicitly' }) allowed_models?: string[] | null;
  @ApiPropertyOptional({ type: [DepartmentOverrideDto] }) department_overrides?: DepartmentOverrideDto[];
  @ApiProperty({ format: 'date-time' }) updated_at!: string;
  @ApiProperty({ description: 'user id of the admin who made this version (`system` for the seed)' }) updated_by!: string;
  @ApiPropertyOptional({ nullable: true }) comment?: string | null;
  @ApiPropertyOptional({ nullable: true, description: 'the version this one replaced' }) based_on?: number | null;
  @ApiPropertyOptional({ nullable: true, description: 'for a rollback: the version it restored' }) restored_from?: number | null;
}

export class RoutingVersionListDto {
  @ApiProperty({ example: 'list' }) object!: string;
  @ApiProperty({ type: [RoutingTableDto], description: 'newest first' }) data!: RoutingTableDto[];
}

function commentOf(body: Body, problems: RoutingProblem[]): string | null {
  const c = body.comment;
  if (c === undefined || c === null) return null;
  // No control characters: PostgreSQL refuses U+0000 (a 400 without `problems`, from the
  // insert), and the others would only garble the version list an admin reads.
  if (typeof c !== 'string' || c.length > MAX_COMMENT || CONTROL.test(c)) {
    problems.push({ param: 'comment', message: `must be a string of at most ${MAX_COMMENT} characters, without control characters` });
    return null;
  }
  return c.trim() === '' ? null : c.trim();
}

function basedOnOf(body: Body, problems: RoutingProblem[], required: boolean): number | undefined {
  const v = body.version;
  if (v === undefined || v === null) {
    if (required) problems.push({ param: 'version', message: 'is required: the version your change is based on (from GET /admin/routing)' });
    return undefined;
  }
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    problems.push({ param: 'version', message: 'must be a positive integer: the version your change is based on' });
    return undefined;
  }
  return v;
}

export class UpdateRoutingTableDto {
  @ApiProperty({ example: 3, description: 'the version this table replaces; 409 conflict when another change landed first' }) version!: number;
  @ApiPropertyOptional({ example: 'code goes to Sonnet first', maxLength: MAX_COMMENT }) comment?: string;
  @ApiProperty({ example: 'general' }) default_task_type!: string;
  @ApiProperty({ type: [RoutingRuleDto] }) rules!: RoutingRuleDto[];
  @ApiPropertyOptional({ type: [String], nullable: true }) allowed_models?: string[] | null;
  @ApiPropertyOptional({ type: [DepartmentOverrideDto] }) department_overrides?: DepartmentOverrideDto[];

  /** Every problem of the table, `version` and `comment` at once; nothing is saved when any. */
  static parse(raw: unknown): { basedOn: number; comment: string | null; body: RoutingTableBody } {
    const body = asBody(raw);
    const problems: RoutingProblem[] = [];
    const basedOn = basedOnOf(body, problems, true);
    const comment = commentOf(body, problems);
    const table = parseRoutingTableBody(body, new Set(['version', 'comment']));
    problems.push(...table.problems);
    if (problems.length > 0 || basedOn === undefined || !table.body) throw invalid(problems);
    return { basedOn, comment, body: table.body };
  }
}

export class DepartmentOverridesDto {
  @ApiProperty({ example: 3, description: 'the table version this change is based on; 409 when stale' }) version!: number;
  @ApiPropertyOptional({ maxLength: MAX_COMMENT }) comment?: string;
  @ApiProperty({ type: [DepartmentOverrideDto], description: "replaces all of this department's overrides ([] removes them); department_id may be omitted" })
  overrides!: DepartmentOverrideDto[];

  static parse(raw: unknown): { basedOn: number; comment: string | null; overrides: unknown } {
    const body = asBody(raw);
    const problems: RoutingProblem[] = [];
    for (const key of Object.keys(body))
      if (!['version', 'comment', 'overrides'].includes(key)) problems.push({ param: key, message: `unknown field '${key}'` });
    const basedOn = basedOnOf(body, problems, true);
    const comment = commentOf(body, problems);
    if (!Array.isArray(body.overrides)) problems.push({ param: 'overrides', message: 'is required: an array of overrides ([] removes them all)' });
    if (problems.length > 0 || basedOn === undefined) throw invalid(problems);
    return { basedOn, comment, overrides: body.overrides };
  }
}

export class RollbackDto {
  @ApiPropertyOptional({ example: 7, description: 'the current version you expect to replace; 409 when stale. Absent = on top of the latest' })
  version?: number;
  @ApiPropertyOptional({ maxLength: MAX_COMMENT }) comment?: string;

  static parse(raw: unknown): { basedOn: number | undefined; comment: string | null } {
    const body = raw === undefined || raw === null ? {} : asBody(raw);
    const problems: RoutingProblem[] = [];
    for (const key of Object.keys(body)) if (key !== 'version' && key !== 'comment') problems.push({ param: key, message: `unknown field '${key}'` });
    const basedOn = basedOnOf(body, problems, false);
    const comment = commentOf(body, problems);
    if (problems.length > 0) throw invalid(problems);
    return { basedOn, comment };
  }
}

export class ResolveRequestDto {
  @ApiPropertyOptional({ example: 'code', description: 'as in the chat request (body task_type or x-task-type); absent = the default' }) task_type?: string;
  @ApiPropertyOptional({ example: 'auto', description: 'a concrete model id, or auto/absent to let the table decide' }) model?: string;
  @ApiPropertyOptional({ type: [String], description: 'an explicit fallback list, as in the chat request' }) models?: string[];
  @ApiPropertyOptional({ minimum: 1, description: "the request's max_tokens, if it names one" }) max_tokens?: number;
  @ApiPropertyOptional({ format: 'uuid', description: "resolve as this user would (their department's overrides apply)" }) user_id?: string;
  @ApiPropertyOptional({ format: 'uuid', description: 'resolve for a department (instead of a user)' }) department_id?: string;
  @ApiPropertyOptional({ description: 'resolve against an older version; absent = the table this instance serves now' }) version?: number;

  static parse(raw: unknown): {
    taskType?: string;
    model?: string;
    models?: string[];
    maxTokens?: number;
    userId?: string;
    departmentId?: string;
    version?: number;
  } {
    const body = asBody(raw);
    const known = ['task_type', 'model', 'models', 'max_tokens', 'user_id', 'department_id', 'version'];
    const unknown = Object.keys(body).find((k) => !known.includes(k));
    if (unknown !== undefined) throw new GatewayError('invalid_value', `Unknown field '${unknown}'.`, { param: unknown });
    const taskType = optionalString(body, 'task_type', 64);
    if (taskType !== undefined && !TASK_TYPE_PATTERN.test(taskType))
      throw new GatewayError('invalid_value', "'task_type' must be a task type name such as 'code'.", { param: 'task_type' });
    // As a real call parses them (chat-request.ts): a dry run must refuse what the call would.
    const model = body.model === undefined || body.model === null ? undefined : parseModelId(body.model, 'model');
    let models: string[] | undefined;
    if (body.models !== undefined && body.models !== null) {
      if (
        !Array.isArray(body.models) ||
        body.models.length === 0 ||
        body.models.length > 10 ||
        !body.models.every((m) => typeof m === 'string' && MODEL_ID_PATTERN.test(m))
      ) {
        throw new GatewayError('invalid_value', "'models' must be a list of 1 to 10 model ids (printable ASCII without spaces).", { param: 'models' });
      }
      models = body.models as string[];
    }
    const uuid = (param: string): string | undefined => {
      const v = optionalString(body, param, 64);
      if (v !== undefined && !isUuid(v)) throw new GatewayError('invalid_value', `'${param}' must be a UUID.`, { param });
      return v?.toLowerCase();
    };
    return {
      taskType,
      model,
      models,
      maxTokens: optionalNumber(body, 'max_tokens', { integer: true, min: 1 }),
      userId: uuid('user_id'),
      departmentId: uuid('department_id'),
      version: body.version === undefined || body.version === null ? undefined : requiredNumber(body, 'version', { integer: true, min: 1 }),
    };
  }
}

export class ResolvedRouteDto {
  @ApiProperty({ description: 'the routing table version that decided' }) version!: number;
  @ApiProperty({ example: 'code' }) task_type!: string;
  @ApiProperty({ example: 'code', description: 'the rule used (the default rule for unknown task types)' }) rule!: string;
  @ApiProperty({ example: 'anthropic/claude-3.5-sonnet', description: 'the model called first' }) model!: string;
  @ApiProperty({ type: [String], example: ['openai/gpt-4o-mini'] }) fallbacks!: string[];
  @ApiProperty({ type: [String], description: 'model then fallbacks: the chain in order' }) models!: string[];
  @ApiProperty({ example: 1024, description: 'max_tokens sent upstream (and reserved)' }) max_tokens!: number;
  @ApiProperty({ example: 1024, description: "the rule's cap on max_tokens" }) max_tokens_cap!: number;
  @ApiProperty({ type: CachePolicyDto, nullable: true }) cache!: CachePolicyDto | null;
  @ApiProperty({ description: 'the caller named a concrete model' }) explicit_model!: boolean;
  @ApiProperty({ format: 'uuid', nullable: true, description: 'the department whose override applied' }) department_override!: string | null;
  @ApiProperty({ example: 'task_type=code; rule=code; version=3', description: 'exactly the x-gateway-route header a request would get' })
  route_header!: string;
}

export function resolvedView(route: ResolvedRoute): ResolvedRouteDto {
  return {
    version: route.version,
    task_type: route.requestedTaskType,
    rule: route.ruleTaskType,
    model: route.models[0] ?? '',
    fallbacks: route.models.slice(1),
    models: route.models,
    max_tokens: route.maxTokens,
    max_tokens_cap: route.maxTokensCap ?? route.maxTokens,
    cache: route.cache ? { enabled: route.cache.enabled, ...(route.cache.ttlSeconds === undefined ? {} : { ttl_seconds: route.cache.ttlSeconds }) } : null,
    explicit_model: route.explicitModel,
    department_override: route.overrideDepartmentId ?? null,
    route_header: routeHeader(route),
  };
}
