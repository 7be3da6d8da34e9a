import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { ApiClient, startTestGateway, type TestGateway } from '../support/gateway.js';

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
});
