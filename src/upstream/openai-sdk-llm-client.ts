import OpenAI from 'openai';
import {
  abortFailure,
  finishedWithError,
  inBandFailure,
  jsonResult,
  LlmClient,
  parseRetryAfter,
  readUpstreamError,
  type UpstreamCall,
  type UpstreamEvents,
  type UpstreamJsonResult,
  UpstreamFailure,
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
 */
export class OpenAiSdkLlmClient extends LlmClient {
  private readonly client: OpenAI;
  private readonly idleMs: number;

  constructor(options: SdkClientOptions) {
    super();
    this.idleMs = options.timeoutMs;
    this.client = new OpenAI({
      apiKey: options.apiKey,
      baseURL: options.baseUrl,
      timeout: options.timeoutMs,
      maxRetries: 0,
      defaultHeaders: options.extraHeaders,
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

  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    let stream: SdkStream;
    try {
      const params = { ...call.body, stream: true } as unknown as OpenAI.Chat.ChatCompletionCreateParamsStreaming;
      stream = await this.client.chat.completions.create(params, { signal: call.signal, headers: { 'x-request-id': call.requestId } });
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    return events(stream, call.signal, this.idleMs);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The SDK's Stream: iterable, with the AbortController of its own request. */
type SdkStream = AsyncIterable<unknown> & { controller?: AbortController };

/**
 * Relays the SDK's parsed chunks. The SDK's `timeout` covers the wait for the headers only; a
 * stream that goes quiet afterwards would hang until the pipeline's deadline, so a gap longer
 * than the timeout between two chunks ends it as a timeout (the undici driver's bodyTimeout).
 */
async function* events(stream: SdkStream, signal: AbortSignal, idleMs: number): AsyncGenerator<string> {
  let sawFinish = false;
  let idled = false;
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      idled = true;
      stream.controller?.abort();
    }, idleMs);
  };
  const quiet = (): UpstreamFailure => new UpstreamFailure('timeout', 'upstream stream went quiet');
  try {
    arm();
    for await (const chunk of stream) {
      arm();
      const choices = (chunk as { choices?: Array<{ finish_reason?: unknown }> }).choices;
      // The SDK throws on an event with an `error` (caught below); one that only finishes a choice
      // as "error" is OpenRouter's mid-generation failure all the same (errorEventFailure).
      if (finishedWithError(choices)) throw new UpstreamFailure('http', 'upstream ended the stream with finish_reason "error"', 502);
      if (choices?.some((c) => c.finish_reason)) sawFinish = true;
      yield JSON.stringify(chunk);
    }
  } catch (error) {
    if (idled) throw quiet();
    const failure = toFailure(error, signal);
    // After the 200 the upstream was reachable: losing the connection now is the stream breaking off.
    throw failure.kind === 'connection' ? new UpstreamFailure('cut', `upstream stream broke off: ${(error as Error).message}`) : failure;
  } finally {
    clearTimeout(timer);
  }
  // The SDK ends a `for await` silently on abort, and hides whether [DONE] arrived: an aborted
  // signal or a stream without a finish_reason is a cut, never a complete answer.
  if (idled) throw quiet();
  if (signal.aborted) throw abortFailure(signal);
  if (!sawFinish) throw new UpstreamFailure('cut', 'upstream stream ended before it finished');
}

function toFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  if (signal.aborted) return abortFailure(signal);
  if (error instanceof OpenAI.APIConnectionTimeoutError) return new UpstreamFailure('timeout', 'upstream did not answer in time');
  if (error instanceof OpenAI.APIUserAbortError) return abortFailure(signal);
  if (error instanceof OpenAI.APIConnectionError) return new UpstreamFailure('connection', `upstream connection failed: ${error.message}`);
  if (error instanceof OpenAI.APIError && typeof error.status === 'number') {
    const { message, code, flagged } = readUpstreamError(error.error, `upstream answered HTTP ${error.status}`);
    return new UpstreamFailure('http', message, error.status, error.headers ? parseRetryAfter(error.headers as Headers) : undefined, code, flagged);
  }
  // No status: the SDK read an SSE event carrying `error` (a 200 stream reporting a failure).
  if (error instanceof OpenAI.APIError) {
    const body: unknown = error.error;
    const reported = inBandFailure({ error: body ?? { message: error.message } });
    if (reported) return reported;
  }
  if (error instanceof SyntaxError) return new UpstreamFailure('bad_response', 'upstream sent a body that is not JSON');
  return new UpstreamFailure('connection', `upstream call failed: ${(error as Error).message}`);
}
