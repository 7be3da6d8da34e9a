/** The route a stored answer took, as its replay's audit row names it. */
export interface StoredRoute {
  requestedTaskType: string;
  ruleTaskType: string;
  version: number;
}

interface StoredCommon {
  /** The gateway's headers the first answer carried (x-gateway-model, -route, -cache, -upstream), without its cost. */
  headers: Record<string, string>;
  model: string;
  route: StoredRoute;
}

/** A JSON answer: the body exactly as it was sent (the chat completion, or /v1/complete's own shape). */
export interface StoredJson extends StoredCommon {
  kind: 'json';
  body: string;
}

/** A stream that completed: the payloads of its events exactly as they were sent, `[DONE]` not included. */
export interface StoredStream extends StoredCommon {
  kind: 'sse';
  events: readonly string[];
}

/** What a sync call with an idempotency-key answered, kept to answer its repeats with. */
export type StoredResponse = StoredJson | StoredStream;

/** A row of `idempotency_keys`. */
export interface IdempotencyRow {
  bodyHash: string;
  state: 'running' | 'done';
  createdAt: Date;
  /** The running call's last heartbeat; when it finished, for a done one. */
  updatedAt: Date;
  /** Set once done. */
  response: StoredResponse | undefined;
}
