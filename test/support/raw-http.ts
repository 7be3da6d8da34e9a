import { type ClientRequest, type IncomingMessage, request } from 'node:http';
import net from 'node:net';

/**
 * Clients that behave as the tests of callers who leave need: a streamed completion handed back at
 * its headers with the body unread, and a raw request whose connection is dropped without reading
 * the answer.
 */

/** A streamed chat completion over a fresh connection, handed back at its headers with the body unread (`req.destroy()` leaves). */
export function openStream(url: string, key: string, content: string): Promise<{ req: ClientRequest; res: IncomingMessage }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${url}/v1/chat/completions`,
      { method: 'POST', agent: false, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' } },
      (res) => resolve({ req, res }),
    );
    req.on('error', reject);
    req.end(JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content }] }));
  });
}

/** Sends one raw request and, `afterMs` later, hangs up (`how`: FIN or RST), never reading the answer. */
export function sendAndLeave(url: string, raw: string, how: 'end' | 'destroy' = 'destroy', afterMs = 0): Promise<void> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const socket = net.connect(Number(port), hostname, () => {
      socket.write(raw, () => {
        setTimeout(() => {
          if (how === 'end') socket.end();
          else socket.destroy();
          setTimeout(resolve, 20);
        }, afterMs);
      });
    });
    socket.on('error', () => resolve());
  });
}

/** One HTTP/1.1 request as bytes; a POST carries a chat completion body of its own (`hi <id>`). */
export function rawRequest(method: string, path: string, key: string, id: string, extra: string[] = []): string {
  const head = [`${method} ${path} HTTP/1.1`, 'host: 127.0.0.1', `authorization: Bearer ${key}`, `x-request-id: ${id}`, ...extra];
  if (method === 'GET') return `${head.join('\r\n')}\r\n\r\n`;
  const body = JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: `hi ${id}` }] });
  head.push('content-type: application/json', `content-length: ${Buffer.byteLength(body)}`);
  return `${head.join('\r\n')}\r\n\r\n${body}`;
}
