import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CompletionCache } from '../../src/cache/completion-cache.service.js';
import { ApiClient, type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { REDIS_URL } from '../support/databases.js';
import { openStream } from '../support/raw-http.js';
import { dropRedisKeys, startRedisProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

type Completion = { id: string; choices: Array<{ message: { content: string } }> };
const prompt = (tag: string) => `${tag} ${randomBytes(4).toString('hex')}`;
const ask = (client: ApiClient, content: string, headers: Record<string, string> = {}) =>
  client.post<Completion>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content }] }, headers);
const cacheOf = (res: HttpResult) => res.headers.get('x-gateway-cache');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('response cache on Redis, shared by two instances', () => {
  let a: TestGateway;
  let b: TestGateway;
  let alice: Tenant;
  let aliceOnB: ApiClient;

  beforeAll(async () => {
    const env = { REDIS_URL, REDIS_KEY_PREFIX: uniqueRedisPrefix('cache-e2e') };
    a = await startTestGateway({ db: 'postgres', env });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey, env });
    alice = await a.tenants.create();
    aliceOnB = new ApiClient(b.url, alice.key);
  });
  afterAll(async () => {
    await a?.admin.delete('/admin/cache');
    await b?.close();
    await a?.close();
  });
  beforeEach(() => {
    a.stub.reset();
  });

  it('serves 20 identical concurrent misses spread over both instances with one upstream call', async () => {
    a.stub.configure({ latencyMs: 300 });
    const content = prompt('stampede-2');
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => ask(i % 2 === 0 ? alice.api : aliceOnB, content)));
    expect(results.map((r) => r.status)).toEqual(Array(20).fill(200));
    expect(a.stub.hits).toBe(1);
    const statuses = results.map(cacheOf);
    expect(statuses.filter((s) => s === 'miss')).toHaveLength(1);
    expect(statuses.filter((s) => s === 'hit')).toHaveLength(19);
    expect(new Set(results.map((r) => r.body.id)).size).toBe(1);
  });

  it('hands the lead to one waiting call of the same instance when the leader’s streaming client leaves', async () => {
    a.stub.configure({ chunkDelayMs: 100 });
    const content = prompt('leader-gone-2');
    const leader = await openStream(a.url, alice.key, content);
    expect(leader.res.statusCode).toBe(200);
    leader.res.on('data', () => undefined);
    const followers = Array.from({ length: 10 }, () => ask(alice.api, content));
    await sleep(300);
    expect(a.stub.hits).toBe(1);
    leader.req.destroy();
    const results = await Promise.all(followers);
    expect(results.map((r) => r.status)).toEqual(Array(10).fill(200));
    // One follower takes over (and the fill lock with it); the other nine get its answer.
    expect({ hits: a.stub.hits, misses: results.filter((r) => cacheOf(r) === 'miss').length }).toEqual({ hits: 2, misses: 1 });
  });

  it('answers on one instance what the other cached, and keeps tenants apart there too', async () => {
    const content = prompt('shared');
    const first = await ask(alice.api, content);
    expect(cacheOf(first)).toBe('miss');
    const second = await ask(aliceOnB, content);
    expect(cacheOf(second)).toBe('hit');
    expect(second.body.id).toBe(first.body.id);
    const bob = await a.tenants.create();
    expect(cacheOf(await ask(new ApiClient(b.url, bob.key), content))).toBe('miss');
    expect(a.stub.hits).toBe(2);
  });

  it('replays on one instance, as SSE, a stream the other cached', async () => {
    const content = prompt('stream-2');
    const live = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content }], stream: true });
    let liveText = '';
    for await (const chunk of live) liveText += chunk.choices[0]?.delta.content ?? '';
    const onB = b.openai(alice.key);
    const { data, response } = await onB.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content }], stream: true }).withResponse();
    expect(response.headers.get('x-gateway-cache')).toBe('hit');
    let replayed = '';
    for await (const chunk of data) replayed += chunk.choices[0]?.delta.content ?? '';
    expect(replayed).toBe(liveText);
    expect(a.stub.hits).toBe(1);
  });

  it('deletes on one instance what the other cached', async () => {
    const content = prompt('delete-2');
    await ask(alice.api, content);
    const deleted = await b.admin.delete(`/admin/cache?user_id=${alice.userId}`);
    expect(deleted.status).toBe(200);
    expect((deleted.body as { deleted: number }).deleted).toBeGreaterThanOrEqual(1);
    await nearCopiesDropped(a);
    expect(cacheOf(await ask(alice.api, content))).toBe('miss');
  });

  it("deletes by user only what that user filled: a colleague's answer that replaced it since stays", async () => {
    const first = await a.tenants.create();
    const shared = await a.admin.patch(`/admin/departments/${first.departmentId}`, { cache_scope: 'department' });
    expect(shared.status).toBe(200);
    const colleague = await a.tenants.create({ departmentId: first.departmentId });
    const content = prompt('refilled');
    expect(cacheOf(await ask(first.api, content))).toBe('miss');
    // The colleague asks for a fresh answer (on the other instance): it replaces the shared entry.
    const refilled = await ask(new ApiClient(b.url, colleague.key), content, { 'cache-control': 'no-cache' });
    expect(cacheOf(refilled)).toBe('miss');

    const byFirst = await a.admin.delete(`/admin/cache?user_id=${first.userId}`);
    expect(byFirst).toMatchObject({ status: 200, body: { deleted: 0 } });
    const kept = await ask(first.api, content);
    expect(cacheOf(kept)).toBe('hit');
    expect(kept.body.id).toBe(refilled.body.id);

    const byColleague = await b.admin.delete(`/admin/cache?user_id=${colleague.userId}`);
    expect(byColleague).toMatchObject({ status: 200, body: { deleted: 1 } });
    await nearCopiesDropped(a);
    expect(cacheOf(await ask(first.api, content))).toBe('miss');
  });

  it('deletes everything but a fill in flight: the identical request waiting on the other instance still gets its one answer', async () => {
    a.stub.configure({ latencyMs: 1500 });
    const content = prompt('purge-in-flight');
    const leader = ask(alice.api, content);
    await pollUntil(() => expect(a.stub.hits).toBe(1));
    const follower = ask(aliceOnB, content);
    await pollUntil(() => expect(b.gateway.app.get(CompletionCache).inFlight).toBe(1));
    // An admin clears the cache while A's leader still waits for the upstream. Had the purge taken
    // the fill lock with the entries, B would find the key free and call the upstream again.
    expect(await a.admin.delete('/admin/cache')).toMatchObject({ status: 200 });
    const [l, f] = await Promise.all([leader, follower]);
    expect([l.status, f.status]).toEqual([200, 200]);
    expect({ upstreamCalls: a.stub.hits, follower: cacheOf(f), sameAnswer: f.body.id === l.body.id }).toEqual({
      upstreamCalls: 1,
      follower: 'hit',
      sameAnswer: true,
    });
    // B got that answer handed over, but it was generated across the purge: it is stored nowhere.
    a.stub.configure({ latencyMs: 0 });
    expect(cacheOf(await ask(aliceOnB, content))).toBe('miss');
    expect(a.stub.hits).toBe(2);
  });

  // A purge on one instance while the other waits for the upstream: what comes back was generated
  // across the purge (a bad batch, a model changed behind the same id), and stored it would undo
  // the purge for the whole TTL, on every instance.
  it('keeps out of the cache an answer whose call began before a purge made on the other instance', async () => {
    a.stub.configure({ latencyMs: 800 });
    const content = prompt('purged-elsewhere');
    const inFlight = ask(alice.api, content);
    await pollUntil(() => expect(a.stub.hits).toBe(1));
    expect(await b.admin.delete(`/admin/cache?user_id=${alice.userId}`)).toMatchObject({ status: 200 });
    expect((await inFlight).status).toBe(200);
    a.stub.configure({ latencyMs: 0 });
    expect(cacheOf(await ask(alice.api, content))).toBe('miss');
    expect(cacheOf(await ask(aliceOnB, content))).toBe('hit');
  });

  it('reports Redis, cache and rate limits up in /health/ready', async () => {
    // B reads an entry A filled: it keeps a near copy, and leases of Alice's counters.
    const content = prompt('health');
    await ask(alice.api, content);
    expect(cacheOf(await ask(aliceOnB, content))).toBe('hit');
    const ready = await b.admin.get('/health/ready');
    expect(ready).toMatchObject({
      status: 200,
      body: { status: 'ok', details: { redis: { status: 'up' }, cache: { status: 'up', driver: 'redis' }, rate_limit: { status: 'up', driver: 'redis', lease_percent: 2 } } },
    });
    const details = (ready.body as { details: { cache: { near_copies: unknown }; rate_limit: { leased_counters: unknown } } }).details;
    expect(details.cache.near_copies).toBeGreaterThan(0);
    expect(details.rate_limit.leased_counters).toBeGreaterThan(0);
  });
});

/**
 * A delete reaches the other instances' near copies through Redis pub/sub, a moment after its
 * answer: wait for `gw` to have heard it (its near copies all gone), as a copy left behind would
 * answer the next ask there for up to CACHE_NEAR_SECONDS.
 */
async function nearCopiesDropped(gw: TestGateway): Promise<void> {
  await pollUntil(async () =>
    expect(((await gw.admin.get('/health/ready')).body as { details: { cache: { near_copies: unknown } } }).details.cache.near_copies).toBe(0),
  );
}

describe('a REDIS_KEY_PREFIX with characters SCAN MATCH reads as a glob', () => {
  // Plain characters in a key; unescaped in a pattern, `[eu]` alone made it match no key here.
  const prefix = uniqueRedisPrefix('cache-glob').replace(/:$/, '*?[eu]\\:');
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { REDIS_URL, REDIS_KEY_PREFIX: prefix } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await dropRedisKeys(prefix);
  });

  it('deletes everything cached there', async () => {
    const content = prompt('glob-prefix');
    expect(cacheOf(await ask(alice.api, content))).toBe('miss');
    expect(cacheOf(await ask(alice.api, content))).toBe('hit');
    expect(await gw.admin.delete('/admin/cache')).toMatchObject({ status: 200, body: { deleted: 1 } });
    expect(cacheOf(await ask(alice.api, content))).toBe('miss');
  });
});

describe('when Redis goes away and comes back', () => {
  let gw: TestGateway;
  let proxy: TcpProxy;
  let alice: Tenant;

  beforeAll(async () => {
    proxy = await startRedisProxy();
    gw = await startTestGateway({ env: { REDIS_URL: proxy.url, REDIS_KEY_PREFIX: uniqueRedisPrefix('outage') } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await proxy?.stop();
  });

  it('keeps serving (cache bypassed, per-instance rate limits), says degraded, and recovers', async () => {
    const content = prompt('outage');
    expect(cacheOf(await ask(alice.api, content))).toBe('miss');
    expect(cacheOf(await ask(alice.api, content))).toBe('hit');

    await proxy.stop();
    // The connections notice the drop when their sockets close. No request has to find it out
    // first (this instance holds the entry near, and a rate-limit lease), so watch the health.
    await pollUntil(
      async () => {
        const degraded = await gw.admin.get<{ status: string; details: Record<string, { status: string }> }>('/health/ready');
        expect(degraded.status).toBe(200);
        expect(degraded.body.status).toBe('degraded');
        expect(degraded.body.details).toMatchObject({
          redis: { status: 'degraded' },
          cache: { status: 'degraded' },
          rate_limit: { status: 'degraded' },
          database: { status: 'up' },
        });
      },
      5_000,
      50,
    );
    // The entry is still in this instance's near copies, but a delete published now would go
    // unheard: with the connections down the cache is bypassed, the near copies included.
    const during = await ask(alice.api, content);
    expect(during.status).toBe(200);
    expect(cacheOf(during)).toBe('bypass');
    expect(during.headers.get('x-ratelimit-remaining-requests')).not.toBeNull();
    // Every request of the outage still answers, none waits for Redis.
    const burst = await Promise.all(Array.from({ length: 10 }, () => ask(alice.api, prompt('during'))));
    expect(burst.map((r) => r.status)).toEqual(Array(10).fill(200));

    await proxy.start();
    await pollUntil(
      async () => {
        const ready = await gw.admin.get<{ status: string }>('/health/ready');
        expect(ready.body.status).toBe('ok');
      },
      15_000,
      100,
    );
    expect(cacheOf(await ask(alice.api, content))).toBe('hit');
    const again = prompt('after');
    expect(cacheOf(await ask(alice.api, again))).toBe('miss');
    expect(cacheOf(await ask(alice.api, again))).toBe('hit');
  });

  it('starts, and serves, with no Redis at all', async () => {
    const dead = await startTestGateway({ env: { REDIS_URL: 'redis://127.0.0.1:1', REDIS_KEY_PREFIX: uniqueRedisPrefix('dead') } });
    try {
      const bob = await dead.tenants.create();
      const res = await ask(bob.api, prompt('dead'));
      expect(res.status).toBe(200);
      expect(cacheOf(res)).toBe('bypass');
      expect(res.headers.get('x-ratelimit-limit-requests')).toBe('600');
      const ready = await dead.admin.get('/health/ready');
      expect(ready).toMatchObject({
        status: 200,
        body: { status: 'degraded', details: { redis: { status: 'degraded' }, rate_limit: { status: 'degraded' } } },
      });
    } finally {
      await dead.close();
    }
  });
});
