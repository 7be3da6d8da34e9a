import { hash } from 'node:crypto';
import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import type { CompletionCall } from '../completion/completion.types.js';
import type { Principal } from '../identity/principal.js';
import type { ResolvedRoute } from '../routing/routing-table.js';

/**
 * Body fields that do not change the answer, or that the key carries in resolved form:
 * the model choice (→ the resolved chain), the token cap (→ the route's cap), stream vs JSON
 * (a cached answer serves both), labels and gateway extensions.
 */
const NOT_IN_KEY = new Set([
  'model',
  'models',
  'route',
  'task_type',
  'callback_url',
  'stream',
  'stream_options',
  'max_tokens',
  'max_completion_tokens',
  'n',
  'user',
  'metadata',
  'store',
]);

/**
 * Part of every key: bumped when what an entry holds changes (2: a header line before the body,
 * cache-entry.ts; 3: a Redis entry is a hash that names its owner, redis-response-cache.ts), so
 * instances of different versions never read each other's entries (an old instance's GET of a
 * hash would fail).
 */
const CACHE_KEY_VERSION = 'entry-v3';

export type CacheBypassReason = 'disabled_by_client' | 'disabled_by_rule' | 'temperature' | 'n' | 'tools';

export interface CachePlan {
  key: string;
  read: boolean;
  write: boolean;
  ttlMs: number;
}

/**
 * Whether a call may use the cache and how. Only deterministic requests are cached: temperature
 * 0 or absent, one choice, no tools (a tool call answers "do this now", and the client acts on it).
 *
 * The routing rule's policy (`route.cache`) comes first: `enabled: false` bypasses the cache for
 * every request of the rule (neither read nor written), and its `ttl_seconds` replaces
 * CACHE_TTL_SECONDS as the lifetime and is a ceiling: a request's `x-gateway-cache-ttl` may ask
 * for less, never more. Without a rule TTL the header replaces the default, as before.
 */
export function cachePlan(call: CompletionCall, route: ResolvedRoute, defaultTtlSeconds: number): CachePlan | CacheBypassReason {
  const policy = route.cache;
  if (policy?.enabled === false) return 'disabled_by_rule';
  const requested = call.cacheControl.ttlSeconds;
  const ruleTtl = policy?.ttlSeconds;
  const ttlSeconds = ruleTtl === undefined ? (requested ?? defaultTtlSeconds) : requested === undefined ? ruleTtl : Math.min(requested, ruleTtl);
  const write = call.cacheControl.write && ttlSeconds > 0;
  const read = call.cacheControl.read;
  if (!read && !write) return 'disabled_by_client';
  const body = call.body;
  if (body.temperature !== undefined && body.temperature !== null && body.temperature !== 0) return 'temperature';
  if (body.n !== undefined && body.n !== null && body.n !== 1) return 'n';
  if (hasItems(body.tools) || hasItems(body.functions)) return 'tools';
  return { key: cacheKey(call.principal, route, body), read, write, ttlMs: ttlSeconds * 1000 };
}

/** The tenant scope: a user's own answers, or the department's when it opted in to sharing. */
export function cacheScope(principal: Principal): string {
  return principal.cacheScope === 'department' ? `department:${principal.departmentId}` : `user:${principal.userId}`;
}

/**
 * sha256 of the scope, the resolved model chain and cap, and every other body field. Top-level
 * fields are sorted so their order does not matter; nested values are hashed as sent (sorting
 * every message object would cost more than the cache saves on large prompts). The routing
 * version is deliberately absent: a new table that resolves to the same models keeps the cache.
 */
export function cacheKey(principal: Principal, route: ResolvedRoute, body: ChatCompletionRequest): string {
  const fields = Object.keys(body)
    .filter((k) => !NOT_IN_KEY.has(k) && body[k] !== undefined)
    .sort();
  const material: Record<string, unknown> = {};
  for (const k of fields) material[k] = body[k];
  const text = `${CACHE_KEY_VERSION}\n${cacheScope(principal)}\n${route.models.join('\n')}\n${route.maxTokens}\n${JSON.stringify(material)}`;
  return hash('sha256', text, 'base64url');
}

function hasItems(value: unknown): boolean {
  return Array.isArray(value) ? value.length > 0 : value !== undefined && value !== null;
}
