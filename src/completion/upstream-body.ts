import type { ResolvedRoute } from '../routing/routing-table.js';
import type { CompletionCall } from './completion.types.js';

// Gateway extensions in the OpenAI body; never forwarded to an upstream that does not know them.
const GATEWAY_FIELDS = ['task_type', 'models', 'route', 'callback_url'] as const;

export function requestedMaxTokens(call: CompletionCall): number | undefined {
  const v = call.body.max_completion_tokens ?? call.body.max_tokens;
  return typeof v === 'number' ? v : undefined;
}

/** The body the upstream gets: the client's, minus gateway fields, with model and cap decided. */
export function upstreamBody(call: CompletionCall, route: ResolvedRoute, model: string, stream: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = { ...call.body };
  for (const field of GATEWAY_FIELDS) delete body[field];
  body.model = model;
  // Keep the client's choice of parameter name; newer OpenAI models reject max_tokens.
  if (body.max_completion_tokens !== undefined) body.max_completion_tokens = route.maxTokens;
  else body.max_tokens = route.maxTokens;
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
