import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ApiClient, type HttpResult, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { REDIS_URL } from '../support/databases.js';
import { uniqueRedisPrefix } from '../support/redis.js';

const ask = (client: ApiClient) =>
  client.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `rl ${randomBytes(4).toString('hex')}` }] });
const remaining = (res: HttpResult) => res.headers.get('x-ratelimit-remaining-requests');

describe('rate limits on Redis hold across two instances', () => {
  let a: TestGateway;
  let b: TestGateway;

  beforeAll(async () => {
    const env = { REDIS_URL, REDIS_KEY_PREFIX: uniqueRedisPrefix('rl-e2e'), RATE_LIMIT_KEY_RPM: '10' };
    a = await startTestGateway({ db: 'postgres', env });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey, env });
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });
  beforeEach(() => {
    a.stub.reset();
  });

  it('serves exactly 10 of 30 concurrent requests spread over both; 429s carry retry-after; nothing else reaches the upstream', async () => {
    const alice = await a.tenants.create();
    const clients = [alice.api, new ApiClient(b.url, alice.key)];
    const results = await Promise.all(Array.from({ length: 30 }, (_, i) => ask(clients[i % 2])));
    const served = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 429);
    expect(served).toHaveLength(10);
    expect(refused).toHaveLength(20);
    expect(a.stub.hits).toBe(10);
    // Every served request saw a different count: one atomic counter, no lost updates.
    expect(served.map((r) => Number(remaining(r))).sort((x, y) => x - y)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    for (const r of served) expect(r.headers.get('x-ratelimit-limit-requests')).toBe('10');
    for (const r of refused) {
      expect(r.body).toMatchObject({ error: { type: 'rate_limit_error', code: 'rate_limit_exceeded' } });
      const retryAfter = Number(r.headers.get('retry-after'));
      expect(retryAfter).toBeGreaterThan(0);
      expect(retryAfter).toBeLessThanOrEqual(60);
      expect(remaining(r)).toBe('0');
    }
  });

  it('counts down the headers in order when the requests alternate between instances', async () => {
    const bob = await a.tenants.create();
    const clients = [bob.api, new ApiClient(b.url, bob.key)];
    const seen: Array<string | null> = [];
    const statuses: number[] = [];
    for (let i = 0; i < 12; i++) {
      const res = await ask(clients[i % 2]);
      statuses.push(res.status);
      seen.push(remaining(res));
    }
    expect(statuses).toEqual([...Array(10).fill(200), 429, 429]);
    expect(seen).toEqual(['9', '8', '7', '6', '5', '4', '3', '2', '1', '0', '0', '0']);
  });

  it('applies an override made on one instance on the other within the refresh interval', async () => {
    const carol = await a.tenants.create();
    expect((await a.admin.put(`/admin/rate-limits/keys/${carol.keyId}`, { requests_per_minute: 25 })).status).toBe(200);
    const onB = new ApiClient(b.url, carol.key);
    await pollUntil(
      async () => {
        expect((await onB.get('/v1/models')).headers.get('x-ratelimit-limit-requests')).toBe('25');
      },
      5000,
      100,
    );
  });

  it('gives back what a limit change voids: a department that made one request gets the rest of its lowered limit', async () => {
    // The default department limit (6,000) is leased: its first request counted 100 more in Redis for instance a.
    const dave = await a.tenants.create();
    expect((await ask(dave.api)).status).toBe(200);
    expect((await a.admin.put(`/admin/rate-limits/departments/${dave.departmentId}`, { requests_per_minute: 5 })).status).toBe(200);
    // One request made: four more under the new limit (not 'used 101' and a 429 for the rest of the minute).
    const next = [];
    for (let i = 0; i < 5; i++) next.push(await ask(dave.api));
    expect(next.map((r) => r.status)).toEqual([200, 200, 200, 200, 429]);
    expect(next.slice(0, 4).map(remaining)).toEqual(['3', '2', '1', '0']);
    expect(next[4]?.body).toMatchObject({ error: { code: 'rate_limit_exceeded', param: 'department' } });
  });
});
