/**
 * The parse floor: the floor plus what any proxy that looks at the traffic cannot avoid. It parses
 * the request body and forwards it re-serialised, parses the answer (a JSON body once buffered, an
 * SSE stream event by event while relaying each chunk as it arrives) and reads `usage`. No state,
 * no other calls. Issue #6 states the cache-hit target against this (shared/PERFORMANCE.md).
 */
import { createServer, type IncomingMessage, request } from 'node:http';
import { StringDecoder } from 'node:string_decoder';
import { endToEnd, type FloorProxy, listenProxy, upstreamAgent, upstreamFailed } from './floor-proxy.js';

export interface ParseFloorProxy extends FloorProxy {
  /** usage.total_tokens summed over every answer: the reads have a visible result, so none is optimised away. */
  readonly totalTokens: number;
}

/** total_tokens of a parsed completion or chunk; 0 when it carries no usage. */
function tokensOf(parsed: unknown): number {
  const usage = (parsed as { usage?: { total_tokens?: unknown } } | null)?.usage;
  return typeof usage?.total_tokens === 'number' ? usage.total_tokens : 0;
}

/**
 * Parses an SSE stream fed in arbitrary chunks: an event ends at a blank line, so the tail after the
 * last one waits for the next chunk (the decoder likewise keeps a split UTF-8 character). Upstreams
 * here (OpenAI, OpenRouter, the stub) frame events with LF only.
 */
export class SseUsageReader {
  private readonly decoder = new StringDecoder('utf8');
  private pending = '';

  /** Returns the total_tokens of the events this chunk completed. */
  push(chunk: Buffer): number {
    const text = this.pending + this.decoder.write(chunk);
    let tokens = 0;
    let start = 0;
    for (let end = text.indexOf('\n\n'); end !== -1; end = text.indexOf('\n\n', start)) {
      tokens += this.event(text.slice(start, end));
      start = end + 2;
    }
    this.pending = text.slice(start);
    return tokens;
  }

  private event(block: string): number {
    let data = '';
    for (const line of block.split('\n')) if (line.startsWith('data:')) data += (data ? '\n' : '') + line.slice(line.startsWith('data: ') ? 6 : 5);
    if (data === '' || data === '[DONE]') return 0;
    try {
      return tokensOf(JSON.parse(data));
    } catch {
      return 0; // relayed as it came: the client judges a malformed event, not the floor
    }
  }
}

function readAll(stream: IncomingMessage, done: (body: Buffer) => void): void {
  const parts: Buffer[] = [];
  stream.on('data', (part: Buffer) => parts.push(part));
  stream.on('end', () => done(Buffer.concat(parts)));
}

export async function startParseFloorProxy(upstreamOrigin: string, port = 0, host = '127.0.0.1'): Promise<ParseFloorProxy> {
  const upstream = new URL(upstreamOrigin);
  const agent = upstreamAgent();
  let totalTokens = 0;
  const server = createServer({ keepAliveTimeout: 65_000 }, (req, res) => {
    readAll(req, (raw) => {
      let body: string;
      try {
        body = JSON.stringify(JSON.parse(raw.toString('utf8')));
      } catch {
        res
          .writeHead(400, { 'content-type': 'application/json' })
          .end(JSON.stringify({ error: { message: 'parse floor: the request body is not JSON', type: 'invalid_request_error' } }));
        return;
      }
      // Re-serialised, so the length may differ from the client's.
      const headers = { ...endToEnd(req.headers), 'content-length': String(Buffer.byteLength(body)) };
      const outgoing = request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers, agent }, (answer) => {
        answer.once('error', (error) => res.destroy(error));
        if (answer.headers['content-type']?.startsWith('text/event-stream')) {
          res.writeHead(answer.statusCode ?? 502, endToEnd(answer.headers));
          // pipe() relays each chunk as it comes (with back-pressure); the reader sees the same chunks after.
          const reader = new SseUsageReader();
          answer.pipe(res);
          answer.on('data', (chunk: Buffer) => (totalTokens += reader.push(chunk)));
          return;
        }
        readAll(answer, (bytes) => {
          try {
            totalTokens += tokensOf(JSON.parse(bytes.toString('utf8')));
          } catch {
            // not JSON (an upstream error page): forwarded as is, like the floor would
          }
          // The upstream's own bytes, so its content-length still holds.
          res.writeHead(answer.statusCode ?? 502, endToEnd(answer.headers)).end(bytes);
        });
      });
      outgoing.on('error', (error) => upstreamFailed(res, error, 'parse floor proxy'));
      outgoing.end(body);
    });
  });
  const proxy = await listenProxy(server, agent, port, host);
  return {
    ...proxy,
    get totalTokens() {
      return totalTokens;
    },
  };
}
