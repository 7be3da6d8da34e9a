import OpenAI, { type ClientOptions } from 'openai';
import { Agent, errors as undiciErrors, fetch as undiciFetch } from 'undici';
import { SseParser } from '../../libs/openai-contract/src/index.js';
import {
  abortFailure,
  checkStreamEvent,
  DriverEvents,
  failureOf,
  jsonResult,
  LlmClient,
  MAX_BYTES_AFTER_DONE,
  namedErrorEventFailure,
  parseRetryAfter,
  readUpstreamError,
  type UpstreamCall,
  type UpstreamEvents,
  type UpstreamJsonResult,
  UpstreamFailure,
  withholdUpstreamKey,
} from './llm-client.js';

export interface SdkClientOptions {
  baseUrl: string;
  apiKey: string;
  timeoutMs: number;
  extraHeaders: Record<string, string>;
}

/**
 * The reference driver on the official `openai` SDK (UPSTREAM_DRIVER=sdk). Correct and well
 * known, but 4-7x the CPU of the undici driver per call (PERFORMANCE.md), so not the default.
 * Retries are the gateway's job (one policy for both drivers), so the SDK's own are off.
 *
 * Timeouts: the SDK's `timeout` only bounds the wait for the headers, so its fetch goes through
 * an undici Agent with the undici driver's byte-level idle timeouts (headersTimeout, bodyTimeout):
 * a JSON body that stalls, or a stream that goes quiet, is a timeout; keep-alive comments
 * (`: OPENROUTER PROCESSING`) are bytes and keep it alive. undici's own fetch, since Node's bundled
 * one rejects a dispatcher from another undici version.
 *
 * Nothing comes from the OPENAI_* environment (the operator's, not the gateway's settings):
 * organization, project and log level are set here, and OPENAI_CUSTOM_HEADERS is undone
 * (envHeadersUnset).
 */
export class OpenAiSdkLlmClient extends LlmClient {
  private readonly client: OpenAI;
  private readonly agent: Agent;

  constructor(options: SdkClientOptions) {
    super();
    withholdUpstreamKey(options.apiKey);
    this.agent = new Agent({ headersTimeout: options.timeoutMs, bodyTimeout: options.timeoutMs });
    this.client = new OpenAI({
      apiKey: options.apiKey,
      baseURL: options.baseUrl,
      organization: null,
      project: null,
      adminAPIKey: null,
      webhookSecret: null,
      logLevel: 'off',
      timeout: options.timeoutMs,
      maxRetries: 0,
      defaultHeaders: { ...envHeadersUnset(options.apiKey), ...options.extraHeaders },
      fetch: undiciFetch as unknown as NonNullable<ClientOptions['fetch']>,
      fetchOptions: { dispatcher: this.agent } as NonNullable<ClientOptions['fetchOptions']>,
    });
  }

  async complete(call: UpstreamCall): Promise<UpstreamJsonResult> {
    let raw: string;
    try {
      // The body goes out as given (no `stream: false` added), and the answer is read as text:
      // `raw` must be the bytes the upstream sent, not the SDK's parse serialised again.
      const params = call.body as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming;
      const response = await this.client.chat.completions.create(params, { signal: call.signal, headers: { 'x-request-id': call.requestId } }).asResponse();
      raw = await response.text();
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    return jsonResult(raw);
  }

  /**
   * The SDK sends the request and maps a refusal (APIError); the 200 body is read here, through the
   * project's SSE parser like the undici driver: the SDK's Stream hides whether `[DONE]` arrived
   * (it ends a cut stream as quietly as a finished one), and whether there was any event at all.
   */
  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    let response: Response;
    try {
      const params = { ...call.body, stream: true } as unknown as OpenAI.Chat.ChatCompletionCreateParamsStreaming;
      response = await this.client.chat.completions.create(params, { signal: call.signal, headers: { 'x-request-id': call.requestId } }).asResponse();
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    return new DriverEvents((out) => events(response, call.signal, out));
  }

  async close(): Promise<void> {
    await this.agent.close();
  }
}

/**
 * The `data` payloads of a 200 stream up to `[DONE]`, as the undici driver relays them: the bytes
 * as sent, each checked to be a JSON object (else bad_response) that reports no failure (an
 * `error`, or a choice finished as "error": eventFailure; a frame named `event: error`), the first
 * one a chunk (it has `choices`). The stream is complete only with its
 * `[DONE]`: ending without it is a cut (or the abort that ended it). `[DONE]` straight away yields
 * nothing, for the caller to refuse as no answer. Each payload goes through `out` with the parse
 * that checked it, which the pipeline reads rather than parsing the event again.
 */
async function* events(response: Response, signal: AbortSignal, out: DriverEvents): AsyncGenerator<string> {
  const body = response.body;
  if (body === null) throw new UpstreamFailure('cut', 'upstream stream ended before [DONE]');
  const reader = (body as ReadableStream<Uint8Array>).getReader();
  const parser = new SseParser();
  /** The body is over (read to its end, or failed): nothing to cancel. */
  let over = false;
  let done = false;
  let first = true;
  try {
    while (!over) {
      let read: Awaited<ReturnType<typeof reader.read>>;
      try {
        read = await reader.read();
      } catch (error) {
        over = true;
        throw streamFailure(error, signal);
      }
      over = read.done;
      const batch = read.done ? parser.flush() : parser.push(read.value);
      const names = parser.names;
      for (let i = 0; i < batch.length; i++) {
        const data = batch[i];
        if (data === '[DONE]') {
          done = true;
          return;
        }
        if (names?.[i] === 'error') throw namedErrorEventFailure(data);
        const event = checkStreamEvent(data, first);
        first = false;
        yield out.yielding(data, event);
      }
    }
  } finally {
    // After [DONE], read the rest (the chunked end) so the connection stays in the pool; before it
    // (the consumer left, or a bad event), stop reading.
    if (!over) {
      if (done) void drain(reader);
      else reader.cancel().catch(() => undefined);
    }
  }
  if (signal.aborted) throw abortFailure(signal);
  throw new UpstreamFailure('cut', 'upstream stream ended before [DONE]');
}

async function drain(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<void> {
  let bytes = 0;
  try {
    for (;;) {
      const read = await reader.read();
      if (read.done) return;
      bytes += read.value.byteLength;
      if (bytes > MAX_BYTES_AFTER_DONE) {
        await reader.cancel();
        return;
      }
    }
  } catch {
    // The answer is complete; what happens to the connection after it is not its failure.
  }
}

/** After the 200 the upstream was reachable: losing the connection now is the stream breaking off. */
function streamFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  const failure = toFailure(error, signal);
  return failure.kind === 'connection' ? new UpstreamFailure('cut', `upstream stream broke off: ${(error as Error).message}`) : failure;
}

/**
 * The headers of OPENAI_CUSTOM_HEADERS (`Name: value` lines, read by the SDK's constructor as it
 * does), each unset: an explicit null, the SDK's way to remove a default header. The gateway's
 * own headers come after and win; an Authorization named there is the gateway's key again.
 */
function envHeadersUnset(apiKey: string): Record<string, string | null> {
  const unset: Record<string, string | null> = {};
  for (const line of (process.env.OPENAI_CUSTOM_HEADERS ?? '').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const name = line.slice(0, colon).trim();
    if (!HTTP_TOKEN.test(name)) continue;
    unset[name] = name.toLowerCase() === 'authorization' ? `Bearer ${apiKey}` : null;
  }
  return unset;
}

const HTTP_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** undici's idle timeouts (the Agent's), found in an error's cause chain (fetch wraps them). */
function isIdleTimeout(error: unknown): boolean {
  let current: unknown = error;
  for (let depth = 0; depth < 4 && current instanceof Error; depth++) {
    if (current instanceof undiciErrors.BodyTimeoutError || current instanceof undiciErrors.HeadersTimeoutError) return true;
    current = current.cause;
  }
  return false;
}

function toFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  if (signal.aborted) return abortFailure(signal);
  if (isIdleTimeout(error)) return new UpstreamFailure('timeout', 'upstream did not answer in time');
  if (error instanceof OpenAI.APIConnectionTimeoutError) return new UpstreamFailure('timeout', 'upstream did not answer in time');
  if (error instanceof OpenAI.APIUserAbortError) return abortFailure(signal);
  if (error instanceof OpenAI.APIConnectionError) return new UpstreamFailure('connection', `upstream connection failed: ${error.message}`);
  if (error instanceof OpenAI.APIError && typeof error.status === 'number') {
    const view = readUpstreamError(error.error, `upstream answered HTTP ${error.status}`);
    return failureOf(view, error.status, error.headers ? parseRetryAfter(error.headers as Headers) : undefined);
  }
  // The SDK parses no 200 body here (asResponse: jsonResult and events() read them), so nothing
  // else it throws is about the answer: the connection failed.
  return new UpstreamFailure('connection', `upstream call failed: ${(error as Error).message}`);
}
