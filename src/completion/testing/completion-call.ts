import type { Principal } from '../../identity/principal.js';
import type { CompletionCall } from '../completion.types.js';

/** A chat call of `principal` asking `messages` plus `body`, readable and writable by the cache; `over` wins. */
export function chatCall(principal: Principal, body: Record<string, unknown>, over: Partial<CompletionCall> = {}): CompletionCall {
  return {
    principal,
    requestId: 'r',
    body: { messages: [{ role: 'user', content: 'hi' }], ...body },
    taskType: undefined,
    door: 'chat',
    signal: new AbortController().signal,
    cacheControl: { read: true, write: true, ttlSeconds: undefined },
    ...over,
  };
}
