import type { ChatCompletion } from '../../../libs/openai-contract/src/index.js';
import type { CompletionCall } from '../../completion/completion.types.js';
import type { AppConfig } from '../../config/config.js';
import { createLogger } from '../../core/logger.js';
import type { ResolvedRoute } from '../../routing/routing-table.js';
import { CompletionCache } from '../completion-cache.service.js';
import type { ResponseCache } from '../response-cache.js';

/** What the CompletionCache tests (unit, and across instances on Redis) build their calls from. */
export const testRoute: ResolvedRoute = { requestedTaskType: 'general', ruleTaskType: 'general', version: 1, models: ['m'], maxTokens: 10, explicitModel: false };

export function testCompletion(content: string): ChatCompletion {
  return {
    id: `c-${content}`,
    object: 'chat.completion',
    created: 1,
    model: 'm',
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
  };
}

/** A cacheable call of one user; the same `content` makes the same cache key. */
export function testCall(content: string, signal = new AbortController().signal): CompletionCall {
  return {
    principal: { keyId: 'k', keyPrefix: 'p', userId: 'u', departmentId: 'd', role: 'user', cacheScope: 'user', expiresAt: undefined },
    requestId: 'r',
    body: { messages: [{ role: 'user', content }] },
    taskType: undefined,
    door: 'chat',
    signal,
    cacheControl: { read: true, write: true, ttlSeconds: undefined },
  };
}

export function testCompletionCache(store: ResponseCache, waitMs: number): CompletionCache {
  const config = { cache: { defaultTtlSeconds: 60, waitMs } } as unknown as AppConfig;
  return new CompletionCache(store, config, { logger: createLogger('silent') });
}
