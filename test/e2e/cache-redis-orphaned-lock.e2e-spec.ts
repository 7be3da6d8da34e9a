import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, openTestRedis, startRedisProxy, type TcpProxy, uniqueRedisPrefix } from '../support/redis.js';

type Completion = { id: string };
const prompt = (tag: string) => `${tag} ${randomBytes(4).toString('hex')}`;
const ask = (tenant: Tenant, content: string) => tenant.api.post<Completion>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content }] });
const cacheOf = (res: HttpResult) => res.headers.get('x-gateway-cache');

/**
 * Redis goes away while a singleflight leader waits for the upstream, and comes back. The leader
 * answers its caller (its fill is lost with the connection: fine), but the fill lock it took in
 * Redis (SET NX PX CACHE_WAIT_MS) must not outlive it: its fill and its release both needed the
 * connection that was down, and until the lock expired every identical request, on every
 * instance, waited on a lock no call held (up to CACHE_WAIT_MS, 15 s by default).
 */
describe('a fill lock taken just before a Redis outage', () => {
  let gw: TestGateway;
  let proxy: TcpProxy;
  let alice: Tenant;
  const prefix = uniqueRedisPrefix('cache-orphaned-lock');

  beforeAll(async () => {
    proxy = await startRedisProxy();
    // A wait far longer than the test: only a release frees the lock in time.
    gw = await startTestGateway({ env: { REDIS_URL: proxy.url, REDIS_KEY_PREFIX: prefix, CACHE_WAIT_MS: '120000' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
    await proxy?.stop();
    await dropRedisKeys(prefix);
  });

  /** Fill locks under this gateway's prefix, read past the proxy. */
  async function fillLocks(): Promise<string[]> {
    const redis = await openTestRedis(prefix);
    try {
      return (await redis.shared().call('KEYS', `${prefix}cache:l:*`)) as string[];
    } finally {
      await redis.onApplicationShutdown();
    }
  }

  it('is released once Redis is back, and the next identical request is an ordinary miss', async () => {
    gw.stub.configure({ latencyMs: 1000 });
    const content = prompt('blip');
    const leader = ask(alice, content);
    // The leader took the fill lock and is waiting for the upstream; then Redis goes away.
    await pollUntil(() => expect(gw.stub.hits).toBe(1));
    expect(await fillLocks()).toHaveLength(1);
    await proxy.stop();
    const led = await leader;
    expect(led.status).toBe(200);
    await proxy.start();
    await pollUntil(async () => expect((await gw.admin.get<{ status: string }>('/health/ready')).body.status).toBe('ok'), 15_000, 100);

    // Nothing is in flight for this key anywhere: no lock is left for anyone to wait on.
    await pollUntil(async () => expect(await fillLocks()).toEqual([]), 30_000, 100);
    gw.stub.configure({});
    const again = await ask(alice, content);
    expect(again.status).toBe(200);
    expect(cacheOf(again)).toBe('miss');
    expect(gw.stub.hits).toBe(2);
  });
});
