import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

/**
 * HTTP/1.1 allows the request target in absolute form (`POST http://host/admin/keys HTTP/1.1`,
 * RFC 9112 §3.2.2: "a server MUST accept the absolute-form in requests"), and forward proxies send
 * it that way. Such requests are routed as usual, and must be audited as usual: the audit hook
 * once decided "is this /admin or /v1?" from the raw target, and they left no row at all.
 */
function send(url: string, text: string): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    let out = '';
    const socket = net.connect(Number(port), hostname, () => socket.write(text));
    socket.on('data', (d) => (out += d.toString()));
    socket.on('close', () => resolve(out));
    socket.on('error', () => resolve(out));
  });
}

function request(method: string, target: string, host: string, key: string, id: string, body?: unknown, extra: string[] = []): string {
  const head = [`${method} ${target} HTTP/1.1`, `host: ${host}`, `authorization: Bearer ${key}`, `x-request-id: ${id}`, 'connection: close', ...extra];
  if (body === undefined) return `${head.join('\r\n')}\r\n\r\n`;
  const text = JSON.stringify(body);
  head.push('content-type: application/json', `content-length: ${Buffer.byteLength(text)}`);
  return `${head.join('\r\n')}\r\n\r\n${text}`;
}

describe('requests whose target is in absolute form (PGlite)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { AUDIT_FLUSH_MS: '20' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('records an admin change, refused admin attempts, a refused /v1 call and an async submit made with an absolute-form target, once each', async () => {
    const host = new URL(gw.url).host;
    const tag = randomBytes(4).toString('hex');
    const alice = await gw.tenants.create();
    const cases: Array<{ id: string; method: string; path: string; key: string; body: unknown; status: number; action: string; extra?: string[] }> = [
      { id: `abs-change-${tag}`, method: 'POST', path: '/admin/departments', key: gw.adminKey, body: { name: `abs-${tag}` }, status: 201, action: 'POST /admin/departments' },
      { id: `abs-401-admin-${tag}`, method: 'POST', path: '/admin/departments', key: `wrong-key-${tag}-0000000000`, body: { name: `x-${tag}` }, status: 401, action: 'POST /admin/departments' },
      { id: `abs-403-admin-${tag}`, method: 'DELETE', path: `/admin/keys/${alice.keyId}`, key: alice.key, body: undefined, status: 403, action: 'DELETE /admin/keys/:id' },
      { id: `abs-401-v1-${tag}`, method: 'GET', path: '/v1/models', key: `wrong-key-${tag}-1111111111`, body: undefined, status: 401, action: 'GET /v1/models' },
      {
        id: `abs-202-v1-${tag}`,
        method: 'POST',
        path: '/v1/chat/completions',
        key: alice.key,
        body: { model: 'auto', messages: [{ role: 'user', content: `async ${tag}` }] },
        status: 202,
        action: 'POST /v1/chat/completions',
        extra: ['prefer: respond-async'],
      },
    ];
    for (const c of cases) {
      const answer = await send(gw.url, request(c.method, `http://${host}${c.path}`, host, c.key, c.id, c.body, c.extra));
      // The gateway routed and answered it like any other request.
      expect(answer.split('\r\n')[0]?.slice(0, 12), c.id).toBe(`HTTP/1.1 ${c.status}`);
    }
    // A marker written after them: once it is stored, everything recorded before it is too.
    const marker = await gw.admin.post<{ id: string }>('/admin/departments', { name: `marker-${tag}` });
    const rows = await pollUntil(async () => {
      const res = await gw.admin.get<AuditListDto>('/admin/audit?limit=500');
      if (!res.body.data.some((e) => e.target_id === marker.body.id)) throw new Error('marker not stored yet');
      return res.body.data;
    });
    const recorded = Object.fromEntries(cases.map((c) => [c.id, rows.filter((e) => e.request_id === c.id).map((e) => [e.action, e.status])]));
    expect(recorded, 'one audit row per request sent with an absolute-form target').toEqual(Object.fromEntries(cases.map((c) => [c.id, [[c.action, c.status]]])));
  });
});
