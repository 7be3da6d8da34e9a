import { type ChatCompletion, readUsage, type Usage } from '../../libs/openai-contract/src/index.js';
import { REDACTED, redactText } from '../audit/redact.js';

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
 * excluded. Iteration throws `UpstreamFailure` when the stream breaks before `[DONE]`. Every
 * payload it yields is a JSON object: both drivers parse each event to check it and refuse any
 * other (checkStreamEvent).
 */
export interface UpstreamEvents extends AsyncIterable<string> {
  /**
   * The parse of a payload this stream yielded. For the one it yielded last, the driver's own
   * parse, so a streamed miss parses each event once, not again in the caller and the pipeline's
   * tracker (BENCHMARKS.md, session 29); an earlier one (held back by a reader) is parsed again,
   * so a reader never gets another event's parse. Shared and read only: the caller, the tracker
   * and the cache's StreamAssembler (which keeps the first as its answer's head) read the same object.
   */
  parsed(payload: string): object;
}

/**
 * How a driver (or a test's double) hands its stream out: the events `read` yields, and the parse
 * of the one it yielded last, which `read` records with `yielding` right before each yield.
 */
export class DriverEvents implements UpstreamEvents {
  private payload: string | undefined = undefined;
  private event: object | undefined = undefined;
  private readonly iterator: AsyncIterator<string>;

  constructor(read: (events: DriverEvents) => AsyncIterator<string>) {
    this.iterator = read(this);
  }

  [Symbol.asyncIterator](): AsyncIterator<string> {
    return this.iterator;
  }

  /** `event` is the parse of `payload`, about to be yielded; returns `payload`. */
  yielding(payload: string, event: object): string {
    this.payload = payload;
    this.event = event;
    return payload;
  }

  parsed(payload: string): object {
    // The same string in the common case: a pointer comparison.
    if (payload === this.payload && this.event !== undefined) return this.event;
    return JSON.parse(payload) as object;
  }
}

export type UpstreamFailureKind = 'http' | 'timeout' | 'connection' | 'bad_response' | 'cut' | 'aborted';

/** What went wrong upstream, in terms the retry policy and the error mapping both understand. */
export class UpstreamFailure extends Error {
  /**
   * What the upstream reported it used (and billed) for this failed attempt: a JSON 200 that carries
   * an error with its usage (OpenRouter's failure mid-generation). Charged like any usage.
   */
  usage: Usage | undefined;

  /** The request field the upstream blamed, relayed with a 400 (set by the drivers from the error view). */
  upstreamParam: string | undefined;

  constructor(
    readonly kind: UpstreamFailureKind,
    message: string,
    readonly status?: number,
    /** From retry-after / retry-after-ms, when the upstream sent one. */
    readonly retryAfterMs?: number,
    /** Upstream's own error code, when it sent an OpenAI envelope. */
    readonly upstreamCode?: string,
    /** The upstream refused the input as flagged by moderation (OpenRouter: a 403 naming `metadata.reasons`). */
    readonly flagged = false,
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

/** What the gateway reads of an upstream's error object (`{message, code, metadata}`). */
export interface UpstreamErrorView {
  message: string;
  code?: string;
  /** The request field the upstream blamed (OpenAI's `param`), when it named one. */
  param?: string;
  /** A moderation refusal: OpenRouter describes flagged input in `metadata` (`reasons`, `flagged_input`). */
  flagged: boolean;
}

/** Reads `{error:{message,code}}` from an upstream error body, tolerating anything. */
export function describeUpstreamError(status: number, text: string): UpstreamErrorView {
  let error: unknown;
  try {
    error = (JSON.parse(text) as { error?: unknown } | null)?.error;
  } catch {
    // not JSON: nothing more to read
  }
  return readUpstreamError(error, `upstream answered HTTP ${status}`);
}

/**
 * The keys the drivers send upstream. An upstream, or a proxy in front of it, may echo the
 * request's Authorization in its error text, and that text reaches the caller, the job record and
 * the log, where the gateway's key must never be (API.md). Each driver adds its own as it is
 * built; none is removed, as a process holds one or two.
 */
const upstreamKeys = new Map<string, RegExp>();

/**
 * Shorter than this, a key is a placeholder (an upstream that needs none still gets one, such as
 * `x` or `none`), not a secret: masking it would garble every message that holds those letters.
 */
const SHORTEST_WITHHELD_KEY = 8;

export function withholdUpstreamKey(key: string): void {
  if (key.length < SHORTEST_WITHHELD_KEY || upstreamKeys.has(key)) return;
  // Whole tokens only: the key as it is echoed (`Bearer <key>`, `"<key>"`, `key=<key>`), not the
  // same letters inside a longer word.
  const escaped = key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  upstreamKeys.set(key, new RegExp(`(?<![\\w-])${escaped}(?![\\w-])`, 'g'));
}

/**
 * An upstream's text as the gateway may repeat it: the configured key masked exactly (a key of
 * no known shape, echoed without `Bearer`, escapes every pattern), then anything key-shaped.
 * Before any cut, so no half key is left; read on failures only, never on a success.
 */
function withoutKeys(text: string): string {
  let out = text;
  for (const pattern of upstreamKeys.values()) out = out.replace(pattern, REDACTED);
  return redactText(out);
}

/** The same, from an error object already parsed (a body, an SSE event, the SDK's APIError.error). */
export function readUpstreamError(error: unknown, fallbackMessage: string): UpstreamErrorView {
  if (typeof error !== 'object' || error === null) return { message: fallbackMessage, flagged: false };
  const { message, code, param, metadata } = error as { message?: unknown; code?: unknown; param?: unknown; metadata?: unknown };
  const meta = typeof metadata === 'object' && metadata !== null ? (metadata as { reasons?: unknown; flagged_input?: unknown }) : undefined;
  // The code and param are relayed too, when they look like one (upstreamToGatewayError).
  return {
    message: typeof message === 'string' && message !== '' ? withoutKeys(message).slice(0, 500) : fallbackMessage,
    code: typeof code === 'string' ? withoutKeys(code) : typeof code === 'number' ? String(code) : undefined,
    param: typeof param === 'string' && param !== '' ? withoutKeys(param) : undefined,
    flagged: meta !== undefined && (Array.isArray(meta.reasons) || typeof meta.flagged_input === 'string'),
  };
}

/**
 * An error the upstream put inside a 200 (OpenRouter, once a model started: `{"error":{"code":402,
 * "message":…}}` as the JSON body, or as an SSE event), as the failure its HTTP status would have
 * been, so it is retried, falls back or stops exactly as that status would. `error.code` names the
 * status when it is one (400-599); otherwise 502, the upstream failing. An error that is not an
 * object (`{"error":"provider overloaded"}`) is a 502 too, its text (if a string) the message: any
 * non-null `error` is a failure, as reportsFailure and the cache's stream replay read it. undefined
 * when `body` has no error (absent or null).
 */
export function inBandFailure(body: unknown): UpstreamFailure | undefined {
  if (typeof body !== 'object' || body === null) return undefined;
  const error = (body as { error?: unknown }).error;
  if (error === undefined || error === null) return undefined;
  if (typeof error !== 'object') {
    const message = typeof error === 'string' && error !== '' ? withoutKeys(error).slice(0, 500) : 'upstream reported an error in a 200 answer';
    return new UpstreamFailure('http', message, 502);
  }
  const view = readUpstreamError(error, 'upstream reported an error in a 200 answer');
  const code = (error as { code?: unknown }).code;
  const status = typeof code === 'number' && Number.isInteger(code) && code >= 400 && code <= 599 ? code : 502;
  return failureOf(view, status);
}

/** An upstream's HTTP error (or one it reported in a 200) as a failure, with what its error object said. */
export function failureOf(view: UpstreamErrorView, status: number, retryAfterMs?: number): UpstreamFailure {
  const failure = new UpstreamFailure('http', view.message, status, retryAfterMs, view.code, view.flagged);
  failure.upstreamParam = view.param;
  return failure;
}

/**
 * A stream frame named `event: error` (how some providers report a failure in a 200 stream, its
 * data `{"message":…}` rather than the `{"error":…}` of OpenRouter's): an error object in it is
 * read as inBandFailure reads one; otherwise the upstream failing, a 502 with the data's message.
 */
export function namedErrorEventFailure(data: string): UpstreamFailure {
  let body: unknown;
  try {
    body = JSON.parse(data);
  } catch {
    // not JSON: the failure is still one, without a message of its own
  }
  // Its usage, if it reports one, is what the failed stream is charged, as eventFailure's.
  return billed(inBandFailure(body) ?? failureOf(readUpstreamError(body, 'upstream sent an error event'), 502), body);
}

/** The first stream event must be a chunk: one without a `choices` list is no answer (as in jsonResult). */
export function notAChunkFailure(): UpstreamFailure {
  return new UpstreamFailure('bad_response', 'upstream sent a first stream event without choices');
}

/**
 * How both drivers read a stream event: parsed in full, so they refuse the same events. One that
 * is not JSON, or not an object, is bad_response (before the first event retried or falling back;
 * after it, the client gets an SSE error event and the stream is neither recorded as ok nor
 * stored for replay); one that reports a failure (OpenRouter's provider errors
 * inside a 200, eventFailure) is that failure; a first one without a `choices` list is no answer.
 *
 * Why a full parse on the hot path: checking only the first and last characters let through an
 * event framed like an object but broken inside (a trailing comma, say), which was relayed,
 * recorded as ok and stored for replay. Measured (2 cores, Node 24, a 297-byte OpenRouter
 * chunk): JSON.parse ≈ 0.75 µs; a bare relay on loopback (the undici driver, StreamTracker and one
 * write per event, 16 streams, one event per upstream packet) went from ≈ 5.6-6.9 to ≈ 6.7-7.5 µs
 * of CPU per event (+0.6-1.1 µs, +9-20%, three runs), about what StreamTracker's own parse per
 * event costs a streamed miss (5.7-7.2% of it, BENCHMARKS.md). Not small, but nothing cheaper
 * catches the class: a JSON grammar scan written in JS measured 0.5-0.9× the parse, for a second
 * grammar to keep equal to V8's. The parsed event also answers the error and `choices` checks (a
 * substring search each before, and a second parse of an event holding `"error"`), and is handed
 * on with its payload (DriverEvents): the caller and StreamTracker read it rather than parsing the
 * event again. The check belongs here, not in a reader: an event a reader refused would leave the
 * driver's generator suspended, its upstream request never ended.
 */
export function checkStreamEvent(data: string, first: boolean): object {
  let event: unknown;
  try {
    event = JSON.parse(data);
  } catch {
    throw new UpstreamFailure('bad_response', 'upstream sent a stream event that is not JSON');
  }
  if (typeof event !== 'object' || event === null || Array.isArray(event)) {
    throw new UpstreamFailure('bad_response', 'upstream sent a stream event that is not a JSON object');
  }
  const reported = eventFailure(event);
  if (reported) throw reported;
  if (first && !Array.isArray((event as { choices?: unknown }).choices)) throw notAChunkFailure();
  return event;
}

/**
 * Bytes an upstream may still send after [DONE] before the gateway stops reading: the rest is
 * read so the connection goes back to the pool, within reason (both drivers).
 */
export const MAX_BYTES_AFTER_DONE = 64 * 1024;

/**
 * The most a JSON answer, or one unfinished stream event, may hold: a misbehaving upstream
 * (a loop, a proxy's error page streamed forever) would otherwise grow the gateway's memory
 * without bound, and after a stream's first event no deadline stops it. Far above any real
 * answer, a base64 image included. Past it the attempt is a bad_response.
 */
export const MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024;
/** What is kept of a refused request's body: its error message is at the start. */
export const MAX_ERROR_BODY_BYTES = 64 * 1024;

/**
 * The same, for a stream event already parsed (the SDK driver parses every event). The event's own
 * usage, if it reports one, is what the failed stream is charged, as a JSON 200's (jsonResult).
 */
export function eventFailure(event: unknown): UpstreamFailure | undefined {
  const failure = inBandFailure(event);
  if (failure) return billed(failure, event);
  if (finishedWithError((event as { choices?: unknown } | null)?.choices)) {
    return billed(new UpstreamFailure('http', 'upstream ended the stream with finish_reason "error"', 502), event);
  }
  return undefined;
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
 * A body with a top-level `error` (OpenRouter's way to report a failure once a model started, with
 * or without the partial choices) is the failure its `error.code` names (inBandFailure). Not JSON,
 * no choices, or an empty list (no answer either: it would be relayed, and charged an estimate, as
 * one) is bad_response, retried or falling back like any failed attempt. So is a choice without a
 * `message` object: the pipeline, the cache's stream replay and /v1/complete all read it, and
 * relayed or cached it would fail every one of them later, as a 500. A choice finished as
 * "error" is the failure its own `error` names (OpenRouter puts it there too), else a 502.
 */
export function jsonResult(raw: string): UpstreamJsonResult {
  let completion: ChatCompletion;
  try {
    completion = JSON.parse(raw) as ChatCompletion;
  } catch {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 with a body that is not JSON');
  }
  const reported = inBandFailure(completion);
  if (reported) throw billed(reported, completion);
  if (typeof completion !== 'object' || completion === null || !Array.isArray(completion.choices) || completion.choices.length === 0) {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 without choices');
  }
  if (!completion.choices.every(hasMessage)) {
    throw new UpstreamFailure('bad_response', 'upstream answered 200 with a choice that has no message');
  }
  // A provider that failed mid-generation, reported inside the choice only (no top-level error):
  // a partial answer, never relayed as a success.
  const failed = choiceFinishedWithError(completion.choices);
  if (failed !== undefined) {
    throw billed(inBandFailure(failed) ?? new UpstreamFailure('http', 'upstream finished a choice with finish_reason "error"', 502), completion);
  }
  return { completion, raw };
}

/** A failed answer still costs what the upstream says it used: the tokens it produced before failing. */
function billed(failure: UpstreamFailure, body: unknown): UpstreamFailure {
  failure.usage = readUsage(body);
  return failure;
}

/**
 * An answer that reports a failure: a top-level `error`, or a choice finished as "error" (a partial
 * answer). Relayed at most, never stored in the cache.
 */
export function reportsFailure(completion: ChatCompletion): boolean {
  const error = (completion as { error?: unknown }).error;
  if (error !== undefined && error !== null) return true;
  return finishedWithError(completion.choices);
}

/** Whether any choice finished as "error": OpenRouter's mark of a provider that failed mid-generation. */
export function finishedWithError(choices: unknown): boolean {
  return choiceFinishedWithError(choices) !== undefined;
}

/** The first choice that finished as "error", if any. */
function choiceFinishedWithError(choices: unknown): unknown {
  return Array.isArray(choices) ? choices.find((c) => (c as { finish_reason?: unknown } | null)?.finish_reason === 'error') : undefined;
}

/** A choice as the pipeline reads it: an object whose `message` is an object. */
export function hasMessage(choice: unknown): boolean {
  if (typeof choice !== 'object' || choice === null) return false;
  const message = (choice as { message?: unknown }).message;
  return typeof message === 'object' && message !== null;
}
