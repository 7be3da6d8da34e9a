import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditEventDto, AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { createLogger } from '../../src/core/logger.js';
import { hashApiKey, keyPrefix } from '../../src/identity/api-key.js';
import { IdentityService } from '../../src/identity/identity.service.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, startTestGateway, type TestGateway } from '../support/gateway.js';
import { rawRequest, sendAndLeave } from '../support/raw-http.js';
import type { TcpProxy } from '../support/redis.js';

// The database bound a refusal waits for: longer than a frozen lookup below (300 ms), shorter than a test.
const DATABASE_REQUEST_TIMEOUT_MS = 1500;
const FAST = { AUDIT_FLUSH_MS: '20', LOG_LEVEL: 'info', DATABASE_REQUEST_TIMEOUT_MS: String(DATABASE_REQUEST_TIMEOUT_MS) };

interface LogLine {
  msg?: string;
  reqId?: string;
  status?: number;
  url?: string;
}

const stranger = () => `gh-${randomBytes(32).toString('base64url')}`;
const requestId = (what: string) => `${what}-${randomBytes(6).toString('hex')}`;

/**
 * README: every refused /v1 request (and every refused admin one) is audited. Fastify runs
 * onResponse only for a response that finished, so a refusal whose caller had gone (a client
 * that gave up while the key lookup waited on a slow database) left no row and no access line.
 * The gateway under test reaches PostgreSQL through a proxy that a test freezes to make it slow.
 */
describe('refused requests whose caller left before the answer (PostgreSQL)', () => {
  let proxied: ProxiedGateway;
  let owner: TestGateway;
  let proxy: TcpProxy;
  let gw: TestGateway;
  const written: string[] = [];

  beforeAll(async () => {
    proxied = await startGatewayBehindPostgresProxy({ env: FAST, logger: createLogger('info', { write: (line: string) => void written.push(line) }) });
    ({ owner, proxy, gw } = proxied);
  });
  afterAll(async () => {
    await proxied?.close();
  });

  /** The rows of these requests, once everything recorded before a marker written now is stored. */
  async function rowsOf(ids: string[]): Promise<AuditEventDto[]> {
    const marker = await gw.admin.post<{ id: string }>('/admin/departments', { name: `marker-${randomBytes(4).toString('hex')}` });
    const all = async () => {
      const res = await gw.admin.get<AuditListDto>('/admin/audit?limit=500');
      expect(res.status).toBe(200);
      return res.body.data;
    };
    await pollUntil(async () => {
      if (!(await all()).some((e) => e.action === 'POST /admin/departments' && e.target_id === marker.body.id)) throw new Error('marker not stored yet');
    });
    return (await all()).filter((e) => e.request_id !== null && ids.includes(e.request_id));
  }

  function accessLines(ids: string[]): LogLine[] {
    return written
      .join('')
      .split('\n')
      .filter((line) => line.length > 0)
      .map((line) => JSON.parse(line) as LogLine)
      .filter((line) => line.msg === 'request' && line.reqId !== undefined && ids.includes(line.reqId));
  }

  it('records a 401 decided after its caller hung up, on /v1 and on an admin read, once each, and logs it', async () => {
    const sent: Array<{ id: string; key: string; action: string }> = [];
    proxy.freeze();
    try {
      for (const [method, path] of [
        ['POST', '/v1/chat/completions'],
        ['GET', '/admin/keys'],
      ] as const) {
        for (let i = 0; i < 2; i++) {
          const key = stranger();
          const id = requestId('left-401');
          sent.push({ id, key, action: `${method} ${path}` });
          await sendAndLeave(gw.url, rawRequest(method, path, key, id), 'destroy');
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 300));
    } finally {
      proxy.thaw();
    }
    // The gateway did look each key up, after its caller had gone, and refused it.
    const identity: IdentityService = gw.gateway.app.get(IdentityService);
    const refused = (identity as unknown as { refused: Map<string, unknown> }).refused;
    await pollUntil(() => expect(sent.every((s) => refused.has(hashApiKey(s.key)))).toBe(true));

    const ids = sent.map((s) => s.id);
    const rows = await rowsOf(ids);
    expect(rows.map((e) => e.request_id).sort()).toEqual([...ids].sort());
    for (const s of sent) {
      expect(rows.find((e) => e.request_id === s.id)).toMatchObject({
        action: s.action,
        status: 401,
        details: { auth: 'invalid_key', key_prefix: keyPrefix(s.key), client_closed: true, error: { code: 'invalid_api_key' } },
      });
    }
    expect(JSON.stringify(rows)).not.toMatch(new RegExp(sent.map((s) => s.key).join('|')));
    // One access line each, with the status the caller saw (it left before the answer: 499).
    expect(accessLines(ids).map((line) => [line.reqId, line.status]).sort()).toEqual(ids.map((id) => [id, 499]).sort());
  });

  it('records a 503 answered after DATABASE_REQUEST_TIMEOUT_MS to callers that had timed out (operations.md: every request still has its audit row)', async () => {
    const sent: Array<{ id: string; path: string }> = [];
    proxy.freeze();
    try {
      for (const path of ['/v1/chat/completions', '/v1/models']) {
        const post = path.endsWith('completions');
        const id = requestId('left-503');
        sent.push({ id, path });
        await fetch(`${gw.url}${path}`, {
          method: post ? 'POST' : 'GET',
          headers: { authorization: `Bearer ${stranger()}`, 'x-request-id': id, ...(post ? { 'content-type': 'application/json' } : {}) },
          body: post ? JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'hi' }] }) : undefined,
          signal: AbortSignal.timeout(200),
        }).then(
          () => expect.unreachable('the caller gave up first'),
          () => undefined,
        );
      }
      // A caller that waits gets the 503, and its row as before (not marked client_closed).
      const control = requestId('waited-503');
      const waited = await fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${stranger()}`, 'x-request-id': control } });
      expect(waited.status).toBe(503);
      sent.push({ id: control, path: '/v1/models' });
    } finally {
      proxy.thaw();
    }
    const ids = sent.map((s) => s.id);
    const rows = await rowsOf(ids);
    expect(rows.map((e) => [e.request_id, e.action, e.status, e.details.client_closed ?? false]).sort()).toEqual(
      [
        [sent[0]?.id, 'POST /v1/chat/completions', 503, true],
        [sent[1]?.id, 'GET /v1/models', 503, true],
        [sent[2]?.id, 'GET /v1/models', 503, false],
      ].sort(),
    );
    expect(accessLines(ids).map((line) => [line.reqId, line.status]).sort()).toEqual(
      [
        [sent[0]?.id, 499],
        [sent[1]?.id, 499],
        [sent[2]?.id, 503],
      ].sort(),
    );
  });

  it('never calls the upstream for a caller that hung up while its key was being looked up', async () => {
    // A key this gateway has never seen: its lookup waits on the frozen database.
    const alice = await owner.tenants.create();
    const hitsBefore = owner.stub.hits;
    const id = requestId('left-valid');
    proxy.freeze();
    try {
      await sendAndLeave(gw.url, rawRequest('POST', '/v1/chat/completions', alice.key, id), 'destroy');
      await new Promise((resolve) => setTimeout(resolve, 300));
    } finally {
      proxy.thaw();
    }
    const [row] = await pollUntil(async () => {
      const rows = await rowsOf([id]);
      if (rows.length === 0) throw new Error('not audited yet');
      return rows;
    });
    // The pipeline took the call after its caller had gone: ended before any attempt, not charged.
    expect(row).toMatchObject({ status: 499, details: { outcome: 'client_closed', attempts: [], cost_nanos: '0' } });
    expect(owner.stub.hits).toBe(hitsBefore);
  });

  // Answered at once, the refusal was usually written before the hang-up reached the gateway: the
  // rows must not depend on which comes first, nor be written twice.
  for (const how of ['end', 'destroy'] as const) {
    it(`records a refusal whose caller hung up at once (${how}), once`, async () => {
      const ids: string[] = [];
      for (let i = 0; i < 5; i++) {
        for (const [method, path] of [
          ['POST', '/v1/chat/completions'],
          ['GET', '/admin/keys'],
        ] as const) {
          const id = requestId(`at-once-${how}`);
          ids.push(id);
          await sendAndLeave(gw.url, rawRequest(method, path, stranger(), id), how);
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 300));
      const rows = await rowsOf(ids);
      expect(rows.map((e) => e.request_id).sort()).toEqual([...ids].sort());
      expect(rows.every((e) => e.status === 401)).toBe(true);
      expect(accessLines(ids).map((line) => line.reqId).sort()).toEqual([...ids].sort());
    });
  }
});

/**
 * Errors Fastify answers before routing (a URL it cannot decode, a path parameter over its length
 * limit) run no hook: under /v1 and /admin they were refused without a row.
 */
describe('requests refused before routing (PGlite)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { AUDIT_FLUSH_MS: '20' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('records an admin or API one once, with the key prefix and the error, never the key; others not', async () => {
    const key = stranger();
    const client = new ApiClient(gw.url, key);
    const cases: Array<[string, string, string | null]> = [
      ['DELETE', `/admin/keys/${'a'.repeat(150)}`, 'DELETE /admin/keys/'],
      ['DELETE', '/admin/keys/%E0%A4%A', 'DELETE /admin/keys/%E0%A4%A'],
      ['GET', '/admin/keys/%zz', 'GET /admin/keys/%zz'],
      // The router would have read %61 as `a`.
      ['POST', '/%61dmin/departments/%E0%A4%A', 'POST /%61dmin/departments/%E0%A4%A'],
      ['POST', '/v1/chat/completions%E0%A4%A', 'POST /v1/chat/completions%E0%A4%A'],
      ['GET', '/elsewhere/%E0%A4%A', null],
    ];
    const ids: Array<[string | null, string | null]> = [];
    for (const [method, path, action] of cases) {
      const res = await client.request(method, path, method === 'POST' ? { model: 'auto', messages: [] } : undefined);
      expect(res.status, `${method} ${path}`).toBe(400);
      ids.push([res.headers.get('x-request-id'), action]);
    }
    const marker = await gw.admin.post<{ id: string }>('/admin/departments', { name: `marker-${randomBytes(4).toString('hex')}` });
    const rows = await pollUntil(async () => {
      const res = await gw.admin.get<AuditListDto>('/admin/audit?limit=500');
      if (!res.body.data.some((e) => e.target_id === marker.body.id)) throw new Error('marker not stored yet');
      return res.body.data;
    });
    for (const [id, action] of ids) {
      const own = rows.filter((e) => e.request_id === id);
      if (action === null) {
        expect(own).toEqual([]);
        continue;
      }
      expect(own, action).toHaveLength(1);
      expect(own[0]?.action.startsWith(action), own[0]?.action).toBe(true);
      expect(own[0]).toMatchObject({ status: 400, actor_user_id: null, details: { key_prefix: keyPrefix(key), error: { code: 'invalid_value' } } });
    }
    expect(JSON.stringify(rows)).not.toContain(key);
  });
});
