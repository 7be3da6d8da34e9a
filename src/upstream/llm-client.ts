import type { ChatCompletion } from '../../libs/openai-contract/src/index.js';

/** One request to the upstream: the full body to send (model and max_tokens already decided). */
export interface UpstreamCall {
  body: Record<string, unknown>;
  requestId: string;
  signal: AbortSignal;
}

export interface UpstreamJsonResult {
  completion: ChatCompletion;
  /** The body exactly as received, so the gateway can relay it without re-serialising. */
  raw: string;
}

/**
 * An upstream stream that has answered 200: its SSE `data` payloads as they arrive, `[DONE]`
 * excluded. Iteration throws `UpstreamFailure` when the stream breaks before `[DONE]`.
 */
export type UpstreamEvents = AsyncIterable<string>;

export type UpstreamFailureKind = 'http' | 'timeout' | 'connection' | 'bad_response' | 'cut' | 'aborted';

/** What went wrong upstream, in terms the retry policy and the error mapping both understand. */
export class UpstreamFailure extends Error {
  constructor(
    readonly kind: UpstreamFailureKind,
    message: string,
    readonly status?: number,
    /** From retry-after / retry-after-ms, when the upstream sent one. */
    readonly retryAfterMs?: number,
    /** Upstream's own error code, when it sent an OpenAI envelope. */
    readonly upstreamCode?: string,
  ) {
    super(message);
    this.name = 'UpstreamFailure';
  }
}

/**
 * The upstream port. Drivers: `UndiciLlmClient` (default: keep-alive pool, bytes relayed as they
 * arrive) and `OpenAiSdkLlmClient` (the official SDK; the reference, 4-7x the CPU per call, see
 * PERFORMANCE.md). Both pass the same contract suite against the stub upstream.
 */
export abstract class LlmClient {
  abstract complete(call: UpstreamCall): Promise<UpstreamJsonResult>;
  /** Resolves once the upstream answered 200 (nothing has reached the client yet). */
  abstract stream(call: UpstreamCall): Promise<UpstreamEvents>;
  abstract close(): Promise<void>;
}

/** Marks responses from the built-in mock, so nobody mistakes them for a real model. */
export abstract class UpstreamInfo {
  declare readonly mock: boolean;
  declare readonly baseUrl: string;
}

export function parseRetryAfter(headers: { get(name: string): string | null | undefined } | Record<string, string | string[] | undefined>): number | undefined {
  const read = (name: string): string | undefined => {
    if (typeof (headers as { get?: unknown }).get === 'function') return (headers as { get(name: string): string | null | undefined }).get(name) ?? undefined;
    const v = (headers as Record<string, string | string[] | undefined>)[name];
    return Array.isArray(v) ? v[0] : v;
  };
  const ms = read('retry-after-ms');
  if (ms !== undefined && Number.isFinite(Number(ms))) return Math.max(0, Number(ms));
  const s = read('retry-after');
  if (s === undefined) return undefined;
  if (Number.isFinite(Number(s))) return Math.max(0, Number(s) * 1000);
  const date = Date.parse(s);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

/** Reads `{error:{message,code}}` from an upstream error body, tolerating anything. */
export function describeUpstreamError(status: number, text: string): { message: string; code?: string } {
  try {
    const parsed = JSON.parse(text) as { error?: { message?: unknown; code?: unknown } };
    const message = typeof parsed.error?.message === 'string' ? parsed.error.message : undefined;
    const code = typeof parsed.error?.code === 'string' ? parsed.error.code : typeof parsed.error?.code === 'number' ? String(parsed.error.code) : undefined;
    if (message) return { message: message.slice(0, 500), code };
  } catch {
    // not JSON: fall through
  }
  return { message: `upstream answered HTTP ${status}` };
}

/** An aborted signal means either our deadline (a timeout) or the client leaving. */
export function abortFailure(signal: AbortSignal): UpstreamFailure {
  const reason: unknown = signal.reason;
  if (reason instanceof UpstreamFailure) return reason;
  if (reason instanceof Error && reason.name === 'TimeoutError') return new UpstreamFailure('timeout', 'upstream did not answer in time');
  return new UpstreamFailure('aborted', 'request aborted');
}

/**
 * A 200 JSON body as both drivers hand it to the pipeline: the completion, and the bytes as sent.
 * Not JSON, no choices, or an empty list (no answer either: it would be relayed, and charged an
 * estimate, as one) is bad_response, retried or falling back like any failed attempt. So is a
 * choice without a `message` object: the pipeline, the cache's stream replay and /v1/complete
 * all read it, and relayed or cached it would fail every one of them later, as a 500.
 */
export function jsonResult(raw: string): UpstreamJsonResult {
  let completion: ChatCompletion;
  try {
    completion = JSON.parse(raw) as ChatCompletion;
  } catch {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 with a body that is not JSON');
  }
  if (typeof completion !== 'object' || completion === null || !Array.isArray(completion.choices) || completion.choices.length === 0) {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 without choices');
  }
  if (!completion.choices.every(hasMessage)) {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 with a choice that has no message');
  }
  return { completion, raw };
}

/** A choice as the pipeline reads it: an object whose `message` is an object. */
export function hasMessage(choice: unknown): boolean {
  if (typeof choice !== 'object' || choice === null) return false;
  const message = (choice as { message?: unknown }).message;
  return typeof message === 'object' && message !== null;
}
