import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuditService } from '../../src/audit/audit.service.js';
import { createLogger } from '../../src/core/logger.js';
import { ApiClient, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

const UPSTREAM_SECRET = 'sk-test-upstream-secret';

/**
 * What an operator's log collector receives: every line the gateway writes at `debug`, through
 * keys created, used (miss, hit, stream), refused (forged, revoked) and an upstream that rejects
 * the gateway's own key. No key may appear in it. The per-request lines skip the wildcard
 * redaction paths (src/core/logger.ts), so this is what guards them.
 */
describe('logs (PGlite, stub upstream, LOG_LEVEL=debug)', () => {
  let gw: TestGateway;
  const written: string[] = [];

  beforeAll(async () => {
    const logger = createLogger('debug', { write: (line: string) => void written.push(line) });
    gw = await startTestGateway({ logger, env: { LOG_LEVEL: 'debug' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('writes one line per request, and no API key, admin key or upstream key', async () => {
    const alice = await gw.tenants.create();
    const ask = { model: 'auto', messages: [{ role: 'user' as const, content: 'logs e2e' }], temperature: 0 };
    const calls: Array<{ what: string; status: number; id: string | null }> = [];
    const call = async (what: string, api: ApiClient, body: unknown) => {
      const res = await api.post<string>('/v1/chat/completions', body);
      calls.push({ what, status: res.status, id: res.headers.get('x-request-id') });
      return res;
    };
    await call('miss', alice.api, ask);
    await call('hit', alice.api, ask);
    expect((await call('stream', alice.api, { ...ask, stream: true, messages: [{ role: 'user', content: 'logs e2e stream' }] })).body).toContain('data: [DONE]');

    const bob = await gw.tenants.create();
    expect((await gw.admin.delete(`/admin/keys/${bob.keyId}`)).status).toBe(200);
    await call('revoked', bob.api, ask);
    const forged = `${alice.key.slice(0, 12)}${randomBytes(16).toString('hex')}`;
    await call('forged', new ApiClient(gw.url, forged), ask);
    await call('bad body', alice.api, { ...ask, temperature: 'hot' });
    gw.stub.configure({ status: 401 });
    await call('upstream refuses our key', alice.api, { ...ask, messages: [{ role: 'user', content: 'upstream says no' }] });
    gw.stub.reset();
    expect(calls.map((c) => [c.what, c.status])).toEqual([
      ['miss', 200],
      ['hit', 200],
      ['stream', 200],
      ['revoked', 401],
      ['forged', 401],
      ['bad body', 400],
      ['upstream refuses our key', 502],
    ]);

    const text = written.join('');
    const lines = text
      .split('\n')
      .filter((line) => line.length > 0)
      .map((line) => JSON.parse(line) as { msg?: string; reqId?: string; status?: number; keyPrefix?: string; cache?: string });
    // Calls the pipeline took have its `completion` line, with the status; the others the access line.
    for (const c of calls) {
      const own = lines.filter((line) => line.reqId === c.id && (line.msg === 'request' || line.msg === 'completion'));
      expect(own.map((line) => [line.msg, line.status]), c.what).toEqual([[c.status === 200 || c.status === 502 ? 'completion' : 'request', c.status]]);
    }
    const byId = (id: string | null) => lines.find((line) => line.reqId === id && line.msg === 'completion');
    expect(byId(calls[1]?.id ?? null)?.cache).toBe('hit');
    expect(alice.key.startsWith(byId(calls[0]?.id ?? null)?.keyPrefix ?? '-')).toBe(true);

    for (const [name, secret] of Object.entries({ alice: alice.key, bob: bob.key, forged, admin: gw.adminKey, upstream: UPSTREAM_SECRET })) {
      expect(text.includes(secret), `the ${name} key appears in the log`).toBe(false);
    }
  });

  it('keeps a caller key sent where it does not belong (query string, malformed Authorization, body field) out of the answers, the log and the audit rows', async () => {
    const carol = await gw.tenants.create();
    const body = { messages: [{ role: 'user', content: 'misplaced key' }] };
    const anon = new ApiClient(gw.url, undefined);
    const answers = [
      await anon.post(`/v1/chat/completions?api_key=${carol.key}`, body),
      await anon.post(`/v1/chat/completions?key=${carol.key}`, body),
      await anon.post('/v1/chat/completions', body, { authorization: `Bearer ${carol.key} extra` }),
      await anon.post('/v1/chat/completions', body, { authorization: `Basic ${Buffer.from(`u:${carol.key}`).toString('base64')}` }),
      await anon.post('/v1/chat/completions', body, { authorization: carol.key }),
      await anon.post('/v1/chat/completions', body, { 'x-api-key': `Bearer ${carol.key}` }),
      await anon.post('/v1/chat/completions', { ...body, api_key: carol.key }),
      await anon.get(`/admin/keys?api_key=${carol.key}`),
      await anon.post(`/admin/departments?token=${carol.key}`, { name: 'x', key: carol.key }),
    ];
    for (const a of answers) {
      expect(a.status).toBe(401);
      expect(JSON.stringify(a.body)).not.toContain(carol.key);
    }
    // Every refusal above leaves an audit row, none of which may hold the key.
    const ids = answers.map((a) => a.headers.get('x-request-id'));
    const rows = await pollUntil(async () => {
      await gw.gateway.app.get(AuditService).flush();
      const found = await gw.gateway.app
        .get(DataSource)
        .query<Array<{ text: string }>>('SELECT a::text AS text FROM audit_events a WHERE request_id = ANY($1)', [ids]);
      expect(found).toHaveLength(answers.length);
      return found;
    });
    expect(rows.map((r) => r.text).join('\n')).not.toContain(carol.key);
    expect(written.join(''), 'the key appears in the log').not.toContain(carol.key);
  });
});
