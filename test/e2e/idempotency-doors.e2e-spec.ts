import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { IDEMPOTENCY_WINDOW_MS } from '../../src/idempotency/idempotency.service.js';
import { DB_KINDS } from '../support/databases.js';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface ErrorBody {
  error: { code: string; type: string; param: string | null; message: string };
}
interface JobBody {
  id: string;
  status: string;
}

/**
 * API.md: 422 `idempotency_key_reused` is "the same idempotency-key with a different body"; the
 * README: "another body, or the other door, 422". Sync calls (idempotency_keys) and async submits
 * (jobs.idempotency_key) share one key space per user: a key used on one side is refused on the
 * other, whatever the body, so one key never names two requests (two upstream calls, two charges).
 */
const unique = (tag: string) => `${tag}-${randomBytes(4).toString('hex')}`;
// temperature > 0: never cached, so an answer that does not reach the upstream can only be a replay.
const chat = (content: string) => ({ model: 'auto', temperature: 0.7, messages: [{ role: 'user', content }] });
const keyed = (key: string) => ({ 'idempotency-key': key });
const async = (key: string) => ({ 'idempotency-key': key, prefer: 'respond-async' });
const replayed = (res: HttpResult) => res.headers.get('idempotent-replayed');
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

describe.each(DB_KINDS)('one idempotency-key space for sync calls and async submits (%s)', (kind) => {
  let gw: TestGateway;
  let alice: Tenant;
  const clock = new ManualClock();

  beforeAll(async () => {
    gw = await startTestGateway({ db: kind, clock, env: NO_RATE_LIMITS });
    alice = await gw.tenants.create({ userBudgetUsd: 5 });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => gw.stub.reset());

  async function jobsWithKey(t: Tenant, key: string): Promise<number> {
    const rows = await gw.gateway.app
      .get(DataSource)
      .query<Array<{ n: number }>>(`SELECT count(*)::int AS n FROM jobs WHERE user_id = $1 AND idempotency_key = $2`, [t.userId, key]);
    return rows[0]?.n ?? -1;
  }

  async function completed(t: Tenant, id: string): Promise<void> {
    await pollUntil(async () => expect((await t.api.get<JobBody>(`/v1/jobs/${id}`)).body.status).toBe('completed'), 20_000, 50);
  }

  it('refuses (422) an async submit with a key a sync call used, whatever the body, and keeps the sync answer', async () => {
    const key = unique('sync-first');
    const body = chat(unique('first question'));
    const sync = await alice.api.post('/v1/chat/completions', body, keyed(key));
    expect(sync.status).toBe(200);

    for (const submitted of [chat(unique('another question')), body]) {
      const refused = await alice.api.post<ErrorBody>('/v1/chat/completions', submitted, async(key));
      expect(refused).toMatchObject({
        status: 422,
        body: { error: { type: 'invalid_request_error', code: 'idempotency_key_reused', param: 'idempotency-key' } },
      });
      expect(refused.body.error.message).toMatch(/sync call/);
    }
    // /v1/complete is the same key space.
    expect(await alice.api.post<ErrorBody>('/v1/complete', { prompt: unique('p'), temperature: 0.7 }, async(key))).toMatchObject({
      status: 422,
      body: { error: { code: 'idempotency_key_reused' } },
    });
    expect(await jobsWithKey(alice, key)).toBe(0);
    expect(gw.stub.hits).toBe(1);

    // The key is still the sync call's: its repeat is replayed.
    const again = await alice.api.post('/v1/chat/completions', body, keyed(key));
    expect(again).toMatchObject({ status: 200, body: sync.body });
    expect(replayed(again)).toBe('true');
    expect(gw.stub.hits).toBe(1);
  });

  it('refuses (422) a sync call with a key an async submit used, whatever the body, without calling the upstream', async () => {
    const key = unique('async-first');
    const body = chat(unique('first question'));
    const job = await alice.api.post<JobBody>('/v1/chat/completions', body, async(key));
    expect(job.status).toBe(202);
    await completed(alice, job.body.id);
    const hits = gw.stub.hits;

    for (const sent of [chat(unique('another question')), body]) {
      const refused = await alice.api.post<ErrorBody>('/v1/chat/completions', sent, keyed(key));
      expect(refused).toMatchObject({
        status: 422,
        body: { error: { type: 'invalid_request_error', code: 'idempotency_key_reused', param: 'idempotency-key' } },
      });
      expect(refused.body.error.message).toMatch(/async job/);
    }
    expect((await alice.api.post<ErrorBody>('/v1/complete', { prompt: unique('p'), temperature: 0.7 }, keyed(key))).status).toBe(422);
    expect(gw.stub.hits).toBe(hits);

    // The key is still the job's: its repeat is given the same job, and no sync claim was left behind.
    const repeat = await alice.api.post<JobBody>('/v1/chat/completions', body, async(key));
    expect(repeat).toMatchObject({ status: 202, body: { id: job.body.id } });
    expect(replayed(repeat)).toBe('true');
    const claims = await gw.gateway.app
      .get(DataSource)
      .query<unknown[]>(`SELECT 1 FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2`, [alice.userId, key]);
    expect(claims).toEqual([]);
  });

  it('refuses a sync call while the async job holding its key is still unfinished', async () => {
    gw.stub.configure({ latencyMs: 1500 });
    const key = unique('async-running');
    const job = await alice.api.post<JobBody>('/v1/chat/completions', chat(unique('slow')), async(key));
    expect(job.status).toBe(202);
    expect((await alice.api.post('/v1/chat/completions', chat(unique('other')), keyed(key))).status).toBe(422);
    await completed(alice, job.body.id);
    expect(gw.stub.hits).toBe(1);
  });

  it('keeps keys per user, and leaves a key a failed sync call freed to either door', async () => {
    const bob = await gw.tenants.create({ userBudgetUsd: 5 });
    const key = unique('shared');
    expect((await alice.api.post('/v1/chat/completions', chat(unique('alice')), keyed(key))).status).toBe(200);
    const bobs = await bob.api.post<JobBody>('/v1/chat/completions', chat(unique('bob')), async(key));
    expect(bobs.status).toBe(202);
    await completed(bob, bobs.body.id);

    const failing = unique('failed');
    gw.stub.configure({ status: 503 });
    expect((await alice.api.post('/v1/chat/completions', chat(unique('fails')), keyed(failing))).status).toBe(502);
    gw.stub.configure({});
    const job = await alice.api.post<JobBody>('/v1/chat/completions', chat(unique('then async')), async(failing));
    expect(job.status).toBe(202);
    await completed(alice, job.body.id);
  });

  it('lets the other door have a key once it expired (24 h), as its own door would', async () => {
    const syncKey = unique('sync-day');
    expect((await alice.api.post('/v1/chat/completions', chat(unique('day one')), keyed(syncKey))).status).toBe(200);
    const asyncKey = unique('async-day');
    const oldJob = await alice.api.post<JobBody>('/v1/chat/completions', chat(unique('day one')), async(asyncKey));
    expect(oldJob.status).toBe(202);
    await completed(alice, oldJob.body.id);

    clock.advance(IDEMPOTENCY_WINDOW_MS - 1000);
    expect((await alice.api.post('/v1/chat/completions', chat(unique('x')), async(syncKey))).status).toBe(422);
    expect((await alice.api.post('/v1/chat/completions', chat(unique('x')), keyed(asyncKey))).status).toBe(422);

    clock.advance(2000);
    // The sync key expired: an async submit takes it, and from then on it is the job's.
    const job = await alice.api.post<JobBody>('/v1/chat/completions', chat(unique('day two')), async(syncKey));
    expect(job.status).toBe(202);
    expect(replayed(job)).toBeNull();
    await completed(alice, job.body.id);
    expect((await alice.api.post('/v1/chat/completions', chat(unique('day two')), keyed(syncKey))).status).toBe(422);

    // The finished job's key expired: a sync call takes it, and from then on it is the call's.
    const sync = await alice.api.post('/v1/chat/completions', chat(unique('day two')), keyed(asyncKey));
    expect(sync.status).toBe(200);
    expect(replayed(sync)).toBeNull();
    expect((await alice.api.post('/v1/chat/completions', chat(unique('day two')), async(asyncKey))).status).toBe(422);
  });
});
