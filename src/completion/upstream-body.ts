import type { ResolvedRoute } from '../routing/routing-table.js';
import type { CompletionCall } from './completion.types.js';

// Gateway extensions in the OpenAI body; never forwarded to an upstream that does not know them.
const GATEWAY_FIELDS = ['task_type', 'models', 'route', 'callback_url'] as const;

/** The two names OpenAI gives the completion-token limit; an upstream may honour either. */
const LIMIT_FIELDS = ['max_completion_tokens', 'max_tokens'] as const;

/**
 * The completion-token limit the client asked for: the smaller of `max_completion_tokens` and
 * `max_tokens` when both are set (an upstream honours one or the other, and either may be the one
 * it reads), null counting as absent. The route caps it; the budget reserves for the result.
 */
export function requestedMaxTokens(call: CompletionCall): number | undefined {
  let limit: number | undefined;
  for (const field of LIMIT_FIELDS) {
    const v = call.body[field];
    if (typeof v === 'number' && (limit === undefined || v < limit)) limit = v;
  }
  return limit;
}

/** The body the upstream gets: the client's, minus gateway fields, with model and cap decided. */
export function upstreamBody(call: CompletionCall, route: ResolvedRoute, model: string, stream: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = { ...call.body };
  for (const field of GATEWAY_FIELDS) delete body[field];
  body.model = model;
  // Every limit the upstream gets is the one reserved for (route.maxTokens): whichever name it
  // reads, it cannot produce more than the budget holds. The client's choice of name is kept
  // (newer OpenAI models reject max_tokens); null is no limit asked for, so it is not sent.
  let named = false;
  for (const field of LIMIT_FIELDS) {
    if (body[field] === undefined || body[field] === null) {
      delete body[field];
    } else {
      body[field] = route.maxTokens;
      named = true;
    }
  }
  if (!named) body.max_tokens = route.maxTokens;
  if (stream) {
    body.stream = true;
    // Always ask for usage so cuts and completions are charged exactly; the usage-only chunk
    // is passed on only to clients that asked for it themselves.
    body.stream_options = { ...(call.body.stream_options ?? {}), include_usage: true };
  } else {
    delete body.stream;
    delete body.stream_options;
  }
  return body;
}
