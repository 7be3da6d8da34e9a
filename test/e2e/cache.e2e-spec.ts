import { randomBytes } from 'node:crypto';
import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { openStream } from '../support/raw-http.js';

type Completion = { id: string; model: string; choices: Array<{ message: { content: string } }> };

/** A prompt no other test uses, so each test starts from an empty cache for it. */
const prompt = (tag: string) => `${tag} ${randomBytes(4).toString('hex')}`;
const ask = (tenant: Tenant, content: string, extra: Record<string, unknown> = {}, headers: Record<string, string> = {}) =>
  tenant.api.post<Completion>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content }], ...extra }, headers);
const cacheOf = (res: HttpResult) => res.headers.get('x-gateway-cache');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('response cache (memory driver, one instance)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('serves 20 identical concurrent misses with one upstream call (singleflight)', async () => {
    gw.stub.configure({ latencyMs: 300 });
    const content = prompt('stampede');
    const results = await Promise.all(Array.from({ length: 20 }, () => ask(alice, content)));
    expect(results.map((r) => r.status)).toEqual(Array(20).fill(200));
    expect(gw.stub.hits).toBe(1);
    const statuses = results.map(cacheOf);
    expect(statuses.filter((s) => s === 'miss')).toHaveLength(1);
    expect(statuses.filter((s) => s === 'hit')).toHaveLength(19);
    // Everyone got the one answer, and only the caller that paid for it was charged.
    expect(new Set(results.map((r) => r.body.id)).size).toBe(1);
    for (const r of results.filter((x) => cacheOf(x) === 'hit')) expect(r.headers.get('x-gateway-cost-usd')).toBe('0');
  });

  describe('when the singleflight leader ends without an answer', () => {
    it('hands the lead to one follower when the leader’s streaming client leaves: the rest get its answer', async () => {
      gw.stub.configure({ chunkDelayMs: 100 });
      const content = prompt('leader-gone');
      const leader = await openStream(gw.url, alice.key, content);
      expect(leader.res.statusCode).toBe(200);
      leader.res.on('data', () => undefined);
      const followers = Array.from({ length: 10 }, () => ask(alice, content));
      await sleep(300);
      expect(gw.stub.hits).toBe(1);
      leader.req.destroy();
      const results = await Promise.all(followers);
      expect(results.map((r) => r.status)).toEqual(Array(10).fill(200));
      // One follower takes over and pays; the other nine get its answer: 2 upstream calls in all.
      expect({ hits: gw.stub.hits, misses: results.filter((r) => cacheOf(r) === 'miss').length }).toEqual({ hits: 2, misses: 1 });
    });

    it('hands the lead to one follower when the leader failed upstream (502)', async () => {
      // Slow, and failing the leader's tries only (2 per model by default).
      gw.stub.configure({ latencyMs: 400, status: 503, failTimes: 2 });
      const content = prompt('leader-failed');
      const leader = ask(alice, content);
      await sleep(100);
      const followers = Array.from({ length: 10 }, () => ask(alice, content));
      expect((await leader).status).toBe(502);
      const results = await Promise.all(followers);
      expect(results.map((r) => r.status)).toEqual(Array(10).fill(200));
      // The leader's 2 failed tries, then the one follower that took over.
      expect(gw.stub.hits).toBe(3);
      expect(results.filter((r) => cacheOf(r) === 'miss')).toHaveLength(1);
    });

    it('gives each follower refused by its own budget (402) one turn, then a colleague with budget leads', async () => {
      const shared = await gw.tenants.create();
      await gw.admin.patch(`/admin/departments/${shared.departmentId}`, { cache_scope: 'department' });
      const broke = await gw.tenants.create({ departmentId: shared.departmentId });
      expect((await gw.admin.put(`/admin/budgets/users/${broke.userId}`, { limit_usd: 0, period: 'total' })).status).toBe(200);
      const colleague = await gw.tenants.create({ departmentId: shared.departmentId });
      // Their keys known already: a first lookup's wait must not reorder the line below.
      for (const tenant of [shared, broke, colleague]) expect((await tenant.api.get('/v1/models')).status).toBe(200);
      gw.stub.configure({ latencyMs: 400, status: 503, failTimes: 2 });
      const content = prompt('leader-402');
      const leader = ask(shared, content);
      await sleep(100);
      // In line in this order: three calls of the user without budget, then two of the colleague.
      const refused = Array.from({ length: 3 }, () => ask(broke, content));
      await sleep(100);
      const others = [ask(colleague, content)];
      await sleep(100);
      others.push(ask(colleague, content));
      expect((await leader).status).toBe(502);
      expect((await Promise.all(refused)).map((r) => r.status)).toEqual([402, 402, 402]);
      const answered = await Promise.all(others);
      expect(answered.map((r) => [r.status, cacheOf(r)])).toEqual([
        [200, 'miss'],
        [200, 'hit'],
      ]);
      // The leader's 2 failed tries and the colleague's one call; the refusals cost none.
      expect(gw.stub.hits).toBe(3);
    });
  });

  it("never gives one user another user's answer, unless their department shares", async () => {
    const sharing = await gw.tenants.create();
    const patched = await gw.admin.patch(`/admin/departments/${sharing.departmentId}`, { cache_scope: 'department' });
    expect(patched).toMatchObject({ status: 200, body: { cache_scope: 'department' } });
    const colleague = await gw.tenants.create({ departmentId: sharing.departmentId });
    const outsider = await gw.tenants.create();
    const content = prompt('scoped');

    const first = await ask(sharing, content);
    expect(cacheOf(first)).toBe('miss');
    const other = await ask(outsider, content);
    expect(cacheOf(other)).toBe('miss');
    expect(other.body.id).not.toBe(first.body.id);
    const shared = await ask(colleague, content);
    expect(cacheOf(shared)).toBe('hit');
    expect(shared.body.id).toBe(first.body.id);
    expect(gw.stub.hits).toBe(2);

    // Default scope (per user): two users of one department do not share.
    const own = await gw.tenants.create();
    const ownColleague = await gw.tenants.create({ departmentId: own.departmentId });
    const content2 = prompt('per-user');
    expect(cacheOf(await ask(own, content2))).toBe('miss');
    expect(cacheOf(await ask(ownColleague, content2))).toBe('miss');
    expect(cacheOf(await ask(own, content2))).toBe('hit');
  });

  it('replays a cached answer as SSE the openai SDK reads, and caches a completed stream for JSON callers', async () => {
    const content = prompt('replay');
    const json = await ask(alice, content);
    expect(cacheOf(json)).toBe('miss');

    const { data: stream, response } = await alice.openai.chat.completions
      .create({ model: 'auto', messages: [{ role: 'user', content }], stream: true, stream_options: { include_usage: true } })
      .withResponse();
    expect(response.headers.get('x-gateway-cache')).toBe('hit');
    expect(response.headers.get('content-type')).toContain('text/event-stream');
    let text = '';
    let usage: OpenAI.CompletionUsage | null | undefined;
    let finish: string | null | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(json.body.choices[0]?.message.content);
    expect(finish).toBe('stop');
    expect(usage?.completion_tokens).toBeGreaterThan(0);

    // A stream first: stored once complete, then served to JSON and stream callers alike.
    const content2 = prompt('stream-first');
    const live = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: content2 }], stream: true });
    let liveText = '';
    for await (const chunk of live) liveText += chunk.choices[0]?.delta.content ?? '';
    const after = await ask(alice, content2);
    expect(cacheOf(after)).toBe('hit');
    expect(after.body.choices[0]?.message.content).toBe(liveText);
    const quiet = await alice.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: content2 }], stream: true });
    const chunks: OpenAI.Chat.ChatCompletionChunk[] = [];
    for await (const chunk of quiet) chunks.push(chunk);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(liveText);
    expect(chunks.every((c) => !c.usage)).toBe(true);
    expect(gw.stub.hits).toBe(2);
  });

  it('honours cache-control: no-store (no write) and no-cache (no read)', async () => {
    const content = prompt('no-store');
    expect(cacheOf(await ask(alice, content, {}, { 'cache-control': 'no-store' }))).toBe('miss');
    expect(cacheOf(await ask(alice, content))).toBe('miss');
    expect(gw.stub.hits).toBe(2);
    expect(cacheOf(await ask(alice, content))).toBe('hit');
    expect(cacheOf(await ask(alice, content, {}, { 'cache-control': 'no-store' }))).toBe('hit');
    expect(gw.stub.hits).toBe(2);

    const fresh = await ask(alice, content, {}, { 'cache-control': 'no-cache' });
    expect(cacheOf(fresh)).toBe('miss');
    expect(gw.stub.hits).toBe(3);
    expect(cacheOf(await ask(alice, content, {}, { 'cache-control': 'no-cache, no-store' }))).toBe('bypass');
    expect(gw.stub.hits).toBe(4);
  });

  it('expires an entry after the x-gateway-cache-ttl the caller asked for', async () => {
    const content = prompt('ttl');
    const ttl = { 'x-gateway-cache-ttl': '1' };
    expect(cacheOf(await ask(alice, content, {}, ttl))).toBe('miss');
    expect(cacheOf(await ask(alice, content, {}, ttl))).toBe('hit');
    await pollUntil(
      async () => {
        expect(cacheOf(await ask(alice, content, {}, ttl))).toBe('miss');
      },
      5000,
      200,
    );
    expect(gw.stub.hits).toBe(2);
    // A TTL of 0 means "do not store".
    const content2 = prompt('ttl0');
    await ask(alice, content2, {}, { 'x-gateway-cache-ttl': '0' });
    expect(cacheOf(await ask(alice, content2))).toBe('miss');
  });

  it('refuses an x-gateway-cache-ttl that is not a whole number of seconds (an empty one included) instead of storing nothing', async () => {
    const content = prompt('ttl-bad');
    for (const value of ['', ' ', 'abc', '1.5', '5.0', '-1', '1e3', '0x10', '2592001']) {
      const res = await ask(alice, content, {}, { 'x-gateway-cache-ttl': value });
      expect(res, JSON.stringify(value)).toMatchObject({
        status: 400,
        body: { error: { type: 'invalid_request_error', code: 'invalid_value', param: 'x-gateway-cache-ttl' } },
      });
    }
    expect(gw.stub.hits).toBe(0);
    expect(cacheOf(await ask(alice, content, {}, { 'x-gateway-cache-ttl': '2592000' }))).toBe('miss');
    expect(cacheOf(await ask(alice, content))).toBe('hit');
  });

  it('bypasses non-deterministic requests (temperature > 0, n > 1, tools)', async () => {
    const content = prompt('bypass');
    const cases: Array<Record<string, unknown>> = [
      { temperature: 0.7 },
      { n: 2 },
      { tools: [{ type: 'function', function: { name: 'send_mail', parameters: { type: 'object', properties: {} } } }] },
    ];
    for (const extra of cases) {
      expect(cacheOf(await ask(alice, content, extra))).toBe('bypass');
      expect(cacheOf(await ask(alice, content, extra))).toBe('bypass');
    }
    expect(gw.stub.hits).toBe(6);
    // temperature 0 is deterministic, and a different entry from "absent".
    expect(cacheOf(await ask(alice, content, { temperature: 0 }))).toBe('miss');
    expect(cacheOf(await ask(alice, content, { temperature: 0 }))).toBe('hit');
    expect(cacheOf(await ask(alice, content))).toBe('miss');
  });

  it('never caches errors or cut streams', async () => {
    const content = prompt('errors');
    gw.stub.configure({ status: 500 });
    expect((await ask(alice, content)).status).toBe(502);
    gw.stub.reset();
    const ok = await ask(alice, content);
    expect(ok.status).toBe(200);
    expect(cacheOf(ok)).toBe('miss');

    const content2 = prompt('cut');
    gw.stub.configure({ cutAfterChunks: 3 });
    const cut = await alice.api.post<string>('/v1/chat/completions', { model: 'auto', stream: true, messages: [{ role: 'user', content: content2 }] });
    expect(cut.body).toContain('"error"');
    gw.stub.reset();
    expect(cacheOf(await ask(alice, content2))).toBe('miss');
  });

  it('caches a stream whose chunks all carry "error": null (no error, as some providers send it)', async () => {
    gw.stub.configure({ errorNull: true });
    const content = prompt('null-error');
    const body = { model: 'auto', stream: true, messages: [{ role: 'user', content }] };
    const first = await alice.api.post<string>('/v1/chat/completions', body);
    expect(first.body).toContain('"error":null');
    expect(cacheOf(first)).toBe('miss');
    const again = await alice.api.post<string>('/v1/chat/completions', body);
    expect(cacheOf(again)).toBe('hit');
    expect(again.body).toContain('data: [DONE]');
    expect(gw.stub.hits).toBe(1);
  });

  it('keys on everything that changes the answer, and not on what does not', async () => {
    const content = prompt('key');
    expect(cacheOf(await ask(alice, content))).toBe('miss');
    // Same answer: labels and the stream flag do not matter; the routed model is the same.
    expect(cacheOf(await ask(alice, content, { user: 'end-user-42', model: 'openai/gpt-4o-mini' }))).toBe('hit');
    // Different answer: another model chain, another cap, another response_format.
    expect(cacheOf(await ask(alice, content, { task_type: 'code' }))).toBe('miss');
    expect(cacheOf(await ask(alice, content, { max_tokens: 3 }))).toBe('miss');
    expect(cacheOf(await ask(alice, content, { response_format: { type: 'json_object' } }))).toBe('miss');
  });

  it('marks /v1/complete hits as cached and free', async () => {
    const p = prompt('simple');
    const first = await alice.api.post<{ cached: boolean; cost_usd: number; content: string }>('/v1/complete', { prompt: p });
    expect(first.body).toMatchObject({ cached: false });
    expect(first.body.cost_usd).toBeGreaterThan(0);
    const second = await alice.api.post<{ cached: boolean; cost_usd: number; content: string }>('/v1/complete', { prompt: p });
    expect(second.body).toMatchObject({ cached: true, cost_usd: 0, content: first.body.content });
    expect(second.headers.get('x-gateway-cost-usd')).toBe('0');
  });

  it('/v1/complete refuses a temperature of the wrong type rather than answer it from the cache as deterministic', async () => {
    const p = prompt('simple-temp');
    for (let i = 0; i < 2; i++) {
      const res = await alice.api.post('/v1/complete', { prompt: p, temperature: '0.9' });
      expect(res).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'temperature' } } });
    }
    expect(gw.stub.hits).toBe(0);
    // A real one is sent on, and not cached.
    for (let i = 0; i < 2; i++) expect(cacheOf(await alice.api.post('/v1/complete', { prompt: p, temperature: 0.9 }))).toBe('bypass');
    expect(gw.stub.requests.at(-1)?.body).toMatchObject({ temperature: 0.9 });
  });

  describe('DELETE /admin/cache', () => {
    it('deletes by user, model, department, or everything', async () => {
      expect((await gw.admin.delete('/admin/cache')).status).toBe(200);
      const bob = await gw.tenants.create();
      const p1 = prompt('inv1');
      const p2 = prompt('inv2');
      const p3 = prompt('inv3');
      await ask(alice, p1);
      await ask(alice, p2, { task_type: 'code' });
      await ask(bob, p3);

      const byModel = await gw.admin.delete(`/admin/cache?model=${encodeURIComponent('anthropic/claude-3.5-sonnet')}`);
      expect(byModel).toMatchObject({ status: 200, body: { object: 'cache.invalidation', deleted: 1, model: 'anthropic/claude-3.5-sonnet' } });
      expect(cacheOf(await ask(alice, p2, { task_type: 'code' }))).toBe('miss');
      expect(cacheOf(await ask(alice, p1))).toBe('hit');

      const byUser = await gw.admin.delete(`/admin/cache?user_id=${alice.userId}`);
      expect(byUser.status).toBe(200);
      expect((byUser.body as { deleted: number }).deleted).toBeGreaterThanOrEqual(2);
      expect(cacheOf(await ask(alice, p1))).toBe('miss');
      expect(cacheOf(await ask(bob, p3))).toBe('hit');

      const byDepartment = await gw.admin.delete(`/admin/cache?department_id=${bob.departmentId}`);
      expect(byDepartment).toMatchObject({ status: 200, body: { deleted: 1, department_id: bob.departmentId } });
      expect(cacheOf(await ask(bob, p3))).toBe('miss');

      const all = await gw.admin.delete('/admin/cache');
      expect((all.body as { deleted: number }).deleted).toBeGreaterThanOrEqual(2);
      expect(cacheOf(await ask(alice, p1))).toBe('miss');
      expect(cacheOf(await ask(bob, p3))).toBe('miss');
    });

    // An admin purges a model's answers (a bad batch from the upstream, a model changed behind the
    // same id) while an identical call is with the upstream: what that call brings back is what
    // was being generated across the purge. Stored, it would be served for the whole TTL as if
    // the purge had never happened; the callers already waiting for it still get it.
    it('keeps out of the cache an answer whose call began before the purge; the calls waiting for it still get it', async () => {
      gw.stub.configure({ latencyMs: 800 });
      const content = prompt('purged-in-flight');
      const model = { model: 'openai/gpt-4o-mini' };
      const leader = ask(alice, content, model);
      await pollUntil(() => expect(gw.stub.hits).toBe(1), 5_000, 5);
      const follower = ask(alice, content, model);

      const purge = await gw.admin.delete('/admin/cache?model=openai/gpt-4o-mini');
      expect(purge.status).toBe(200);

      const [l, f] = await Promise.all([leader, follower]);
      expect([l.status, f.status]).toEqual([200, 200]);
      expect({ follower: cacheOf(f), sameAnswer: f.body.id === l.body.id, upstreamCalls: gw.stub.hits }).toEqual({
        follower: 'hit',
        sameAnswer: true,
        upstreamCalls: 1,
      });
      // Asked again once the purge has answered: from the upstream, not the cache.
      gw.stub.configure({ latencyMs: 0 });
      expect(cacheOf(await ask(alice, content, model))).toBe('miss');
      expect(gw.stub.hits).toBe(2);
      expect(cacheOf(await ask(alice, content, model))).toBe('hit');
    });

    it('does not count an entry that had already expired as deleted (as on Redis)', async () => {
      // Its only entry: the other tests' live ones would be counted.
      const carol = await gw.tenants.create();
      expect(cacheOf(await ask(carol, prompt('expired'), {}, { 'x-gateway-cache-ttl': '1' }))).toBe('miss');
      await sleep(1100);
      const purge = await gw.admin.delete(`/admin/cache?user_id=${carol.userId}`);
      expect(purge).toMatchObject({ status: 200, body: { deleted: 0 } });
    });

    it('rejects bad filters and non-admin keys', async () => {
      const bad = await gw.admin.delete('/admin/cache?user_id=not-a-uuid');
      expect(bad).toMatchObject({ status: 400, body: { error: { type: 'invalid_request_error', code: 'invalid_value', param: 'user_id' } } });
      const forbidden = await alice.api.delete('/admin/cache');
      expect(forbidden).toMatchObject({ status: 403, body: { error: { code: 'forbidden' } } });
    });
  });

  it('reports the cache in /health/ready', async () => {
    const ready = await gw.admin.get('/health/ready');
    expect(ready).toMatchObject({
      status: 200,
      body: { details: { cache: { status: 'up', driver: 'memory' }, rate_limit: { status: 'up', driver: 'memory' } } },
    });
  });
});
