import { Pool, errors as undiciErrors } from 'undici';
import type { Dispatcher } from 'undici';
import { type ChatCompletion, SseParser } from '../../libs/openai-contract/src/index.js';
import { abortFailure, describeUpstreamError, LlmClient, parseRetryAfter, type UpstreamCall, type UpstreamEvents, type UpstreamJsonResult, UpstreamFailure } from './llm-client.js';

export interface UndiciClientOptions {
  baseUrl: string;
  apiKey: string;
  timeoutMs: number;
  connections: number;
  extraHeaders: Record<string, string>;
}

/**
 * The default upstream driver: one keep-alive undici Pool per upstream origin, the body sent as
 * one string, the response read once. SSE is relayed event by event as bytes arrive.
 */
export class UndiciLlmClient extends LlmClient {
  private readonly pool: Pool;
  private readonly path: string;
  private readonly headers: Record<string, string>;

  constructor(private readonly options: UndiciClientOptions) {
    super();
    const url = new URL(options.baseUrl);
    this.pool = new Pool(url.origin, { connections: options.connections, keepAliveTimeout: 30_000, pipelining: 1 });
    this.path = `${url.pathname.replace(/\/+$/, '')}/chat/completions`;
    this.headers = { 'content-type': 'application/json', authorization: `Bearer ${options.apiKey}`, ...options.extraHeaders };
  }

  private async send(call: UpstreamCall, stream: boolean): Promise<Dispatcher.ResponseData> {
    try {
      return await this.pool.request({
        method: 'POST',
        path: this.path,
        headers: { ...this.headers, 'x-request-id': call.requestId, accept: stream ? 'text/event-stream' : 'application/json' },
        body: JSON.stringify(call.body),
        signal: call.signal,
        headersTimeout: this.options.timeoutMs,
        bodyTimeout: this.options.timeoutMs,
      });
    } catch (error) {
      throw toFailure(error, call.signal);
    }
  }

  async complete(call: UpstreamCall): Promise<UpstreamJsonResult> {
    const response = await this.send(call, false);
    let raw: string;
    try {
      raw = await response.body.text();
    } catch (error) {
      throw toFailure(error, call.signal);
    }
    if (response.statusCode !== 200) throw httpFailure(response.statusCode, raw, response.headers);
    let completion: ChatCompletion;
    try {
      completion = JSON.parse(raw) as ChatCompletion;
    } catch {
      throw new UpstreamFailure('bad_response', 'upstream answered 200 with a body that is not JSON');
    }
    if (typeof completion !== 'object' || completion === null || !Array.isArray(completion.choices)) {
      throw new UpstreamFailure('bad_response', 'upstream answered 200 without choices');
    }
    return { completion, raw };
  }

  async stream(call: UpstreamCall): Promise<UpstreamEvents> {
    const response = await this.send(call, true);
    if (response.statusCode !== 200) {
      const text = await response.body.text().catch(() => '');
      throw httpFailure(response.statusCode, text, response.headers);
    }
    return relay(response.body, call.signal);
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}

async function* relay(body: Dispatcher.ResponseData['body'], signal: AbortSignal): AsyncGenerator<string> {
  const parser = new SseParser();
  try {
    for await (const chunk of body) {
      for (const data of parser.push(chunk as Buffer)) {
        if (data === '[DONE]') return;
        yield data;
      }
    }
  } catch (error) {
    throw toFailure(error, signal);
  } finally {
    // Stop reading from the upstream when the consumer leaves early (client went away).
    if (!body.destroyed) body.destroy();
  }
  for (const data of parser.flush()) {
    if (data === '[DONE]') return;
    yield data;
  }
  if (signal.aborted) throw abortFailure(signal);
  throw new UpstreamFailure('cut', 'upstream stream ended before [DONE]');
}

function httpFailure(status: number, text: string, headers: Dispatcher.ResponseData['headers']): UpstreamFailure {
  const { message, code } = describeUpstreamError(status, text);
  return new UpstreamFailure('http', message, status, parseRetryAfter(headers), code);
}

function toFailure(error: unknown, signal: AbortSignal): UpstreamFailure {
  if (error instanceof UpstreamFailure) return error;
  if (signal.aborted) return abortFailure(signal);
  if (error instanceof undiciErrors.HeadersTimeoutError || error instanceof undiciErrors.BodyTimeoutError) {
    return new UpstreamFailure('timeout', 'upstream did not answer in time');
  }
  return new UpstreamFailure('connection', `upstream connection failed: ${(error as Error).message}`);
}
