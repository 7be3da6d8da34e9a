/**
 * The floor: what any Node forwarding proxy costs on this machine. Plain node:http on both sides,
 * a keep-alive agent to the upstream, request and response piped through untouched (no parsing).
 * The gateway's CPU per request is reported as a multiple of this.
 */
import { Agent, createServer, type IncomingHttpHeaders, request, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

// Connection-level headers belong to each hop, not to the message (RFC 9110 §7.6.1).
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'transfer-encoding', 'proxy-connection', 'upgrade', 'te', 'trailer']);

export function endToEnd(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {};
  for (const name in headers) if (!HOP_BY_HOP.has(name)) out[name] = headers[name];
  return out;
}

export interface FloorProxy {
  url: string;
  port: number;
  server: Server;
  close(): Promise<void>;
}

/** The upstream side of both floors: one keep-alive pool, as any production proxy would keep. */
export function upstreamAgent(): Agent {
  return new Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 30_000 });
}

export async function startFloorProxy(upstreamOrigin: string, port = 0, host = '127.0.0.1'): Promise<FloorProxy> {
  const upstream = new URL(upstreamOrigin);
  const agent = upstreamAgent();
  const server = createServer({ keepAliveTimeout: 65_000 }, (req, res) => {
    const outgoing = request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: endToEnd(req.headers), agent },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, endToEnd(answer.headers));
        answer.pipe(res);
      },
    );
    outgoing.on('error', (error) => upstreamFailed(res, error, 'floor proxy'));
    req.pipe(outgoing);
  });
  return listenProxy(server, agent, port, host);
}

/** The upstream could not be reached: a 502 if nothing was sent yet, else the answer is cut. */
export function upstreamFailed(res: ServerResponse, error: Error, who: string): void {
  if (res.headersSent) res.destroy(error);
  else
    res.writeHead(502, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: `${who}: ${error.message}`, type: 'upstream_error' } }));
}

/** Binds `server` and returns the handle both floors hand out (close also drops the upstream pool). */
export async function listenProxy(server: Server, agent: Agent, port: number, host: string): Promise<FloorProxy> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = (server.address() as AddressInfo).port;
  return {
    url: `http://${host}:${bound}`,
    port: bound,
    server,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        agent.destroy();
      }),
  };
}
