import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { AuditEventDto, AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { AuditService } from '../../src/audit/audit.service.js';
import { BudgetService } from '../../src/budget/budget.service.js';
import { ManualClock } from '../../src/core/clock.js';
import { submissionHash } from '../../src/idempotency/idempotency-key.js';
import { abandonedAfterMs, IDEMPOTENCY_WINDOW_MS } from '../../src/idempotency/idempotency.service.js';
import { type HttpResult, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface ErrorBody {
  error: { code: string; type: string; param: string | null };
}
interface UsageBody {
  user: { spent_usd: number };
  spend: Array<{ model: string; requests: number; cost_usd: number }>;
}

const unique = (tag: string) => `${tag}-${randomBytes(4).toString('hex')}`;
// temperature > 0: never cached, so an answer that does not reach the upstream can only be a replay.
const chat = (content: string, extra: Record<string, unknown> = {}) => ({ model: 'auto', temperature: 0.7, messages: [{ role: 'user', content }], ...extra });
const keyed = (key: string) => ({ 'idempotency-key': key });
const cost = (res: HttpResult) => res.headers.get('x-gateway-cost-usd');
const replayed = (res: HttpResult) => res.headers.get('idempotent-replayed');

describe('idempotency-key on sync calls (PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  const clock = new ManualClock();

  beforeAll(async () => {
    gw = await startTestGateway({ clock });
    alice = await gw.tenants.create({ userBudgetUsd: 5 });
  });
  afterAll(async () => {
    await gw.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  /** What the tenant was charged, with every queued settle written first. */
  async function charged(t: Tenant): Promise<{ spent: number; requests: number; costUsd: number }> {
    expect(await gw.gateway.app.get(BudgetService).flush()).toBe(true);
    const usage = await t.api.get<UsageBody>('/v1/usage');
    expect(usage.status).toBe(200);
    const budget = await gw.admin.get<{ spent_usd: number }>(`/admin/budgets/users/${t.userId}`);
    return {
      spent: budget.body.spent_usd,
      requests: usage.body.spend.reduce((n, s) => n + s.requests, 0),
      costUsd: usage.body.spend.reduce((n, s) => n + s.cost_usd, 0),
    };
  }

  async function auditRows(requestId: string | null): Promise<AuditEventDto[]> {
    expect(requestId).toBeTruthy();
    expect(await gw.gateway.app.get(AuditService).flush()).toBe(true);
    const res = await gw.admin.get<AuditListDto>('/admin/audit?limit=500');
    return res.body.data.filter((e) => e.request_id === requestId);
  }

  it('answers a repeated chat call with the stored answer: same body and headers, cost 0, no upstream call, no charge, audited', async () => {
    const body = chat(unique('repeat'));
    const first = await alice.api.post<{ id: string }>('/v1/chat/completions', body, keyed('sync-1'));
    expect(first.status).toBe(200);
    expect(Number(cost(first))).toBeGreaterThan(0);
    expect(replayed(first)).toBeNull();
    const before = await charged(alice);

    const again = await alice.api.post<{ id: string }>('/v1/chat/completions', body, keyed('sync-1'));
    expect(again.status).toBe(200);
    expect(again.body).toEqual(first.body);
    expect(replayed(again)).toBe('true');
    expect(cost(again)).toBe('0');
    for (const header of ['x-gateway-model', 'x-gateway-route', 'x-gateway-cache', 'content-type'])
      expect(again.headers.get(header)).toBe(first.headers.get(header));
    expect(again.headers.get('x-request-id')).not.toBe(first.headers.get('x-request-id'));
    expect(gw.stub.hits).toBe(1);
    expect(await charged(alice)).toEqual(before);

    // Every request leaves an audit row: the replay is a free completion with no attempt.
    const [row, ...more] = await auditRows(again.headers.get('x-request-id'));
    expect(more).toEqual([]);
    expect(row).toMatchObject({
      action: 'completion',
      status: 200,
      actor_key_id: alice.keyId,
      details: { outcome: 'idempotent_replay', cost_nanos: '0', attempts: [], model: first.headers.get('x-gateway-model'), door: 'chat' },
    });
  });

  it('refuses the same key with another body (422) or another door, and a malformed key (400), without calling the upstream', async () => {
    const body = chat(unique('reuse'));
    expect((await alice.api.post('/v1/chat/completions', body, keyed('sync-reuse'))).status).toBe(200);
    const other = await alice.api.post<ErrorBody>('/v1/chat/completions', chat(unique('other')), keyed('sync-reuse'));
    expect(other).toMatchObject({ status: 422, body: { error: { type: 'invalid_request_error', code: 'idempotency_key_reused', param: 'idempotency-key' } } });
    const otherDoor = await alice.api.post<ErrorBody>('/v1/complete', { prompt: 'x', temperature: 0.7 }, keyed('sync-reuse'));
    expect(otherDoor).toMatchObject({ status: 422, body: { error: { code: 'idempotency_key_reused' } } });
    const malformed = await alice.api.post<ErrorBody>('/v1/chat/completions', body, keyed('has spaces'));
    expect(malformed).toMatchObject({ status: 400, body: { error: { code: 'invalid_value', param: 'idempotency-key' } } });
    expect(gw.stub.hits).toBe(1);
    // The refusals are audited like any refused request.
    expect(await auditRows(other.headers.get('x-request-id'))).toMatchObject([{ status: 422, details: { error: { code: 'idempotency_key_reused' } } }]);
  });

  it('keeps keys per user: the same key of two users names two calls', async () => {
    const bob = await gw.tenants.create();
    const aliceBody = chat(unique('alice'));
    const bobBody = chat(unique('bob'));
    const alices = await alice.api.post('/v1/chat/completions', aliceBody, keyed('sync-shared'));
    const bobs = await bob.api.post('/v1/chat/completions', bobBody, keyed('sync-shared'));
    expect(bobs.status).toBe(200);
    expect(replayed(bobs)).toBeNull();
    expect(await alice.api.post('/v1/chat/completions', aliceBody, keyed('sync-shared'))).toMatchObject({ status: 200, body: alices.body });
    expect(await bob.api.post('/v1/chat/completions', bobBody, keyed('sync-shared'))).toMatchObject({ status: 200, body: bobs.body });
    expect(gw.stub.hits).toBe(2);
  });

  it('answers 409 request_in_progress to a repeat while the first call runs, and the answer once it is done', async () => {
    gw.stub.configure({ latencyMs: 1500 });
    const body = chat(unique('slow'));
    const first = alice.api.post('/v1/chat/completions', body, keyed('sync-slow'));
    await pollUntil(() => expect(gw.stub.hits).toBe(1));
    const during = await alice.api.post<ErrorBody>('/v1/chat/completions', body, keyed('sync-slow'));
    expect(during).toMatchObject({ status: 409, body: { error: { type: 'conflict_error', code: 'request_in_progress', param: 'idempotency-key' } } });
    expect(during.headers.get('retry-after')).toBe('1');
    const done = await first;
    expect(done.status).toBe(200);
    const after = await alice.api.post('/v1/chat/completions', body, keyed('sync-slow'));
    expect(after).toMatchObject({ status: 200, body: done.body });
    expect(replayed(after)).toBe('true');
    expect(gw.stub.hits).toBe(1);
  });

  it('frees the key of a call that failed, so the retry runs (and is then stored)', async () => {
    const body = chat(unique('fails'));
    gw.stub.configure({ status: 503 });
    const failed = await alice.api.post<ErrorBody>('/v1/chat/completions', body, keyed('sync-fails'));
    expect(failed.status).toBe(502);
    const hitsOfFailure = gw.stub.hits;
    gw.stub.configure({});
    const retry = await alice.api.post('/v1/chat/completions', body, keyed('sync-fails'));
    expect(retry.status).toBe(200);
    expect(replayed(retry)).toBeNull();
    expect(gw.stub.hits).toBe(hitsOfFailure + 1);
    const again = await alice.api.post('/v1/chat/completions', body, keyed('sync-fails'));
    expect(again).toMatchObject({ status: 200, body: retry.body });
    expect(gw.stub.hits).toBe(hitsOfFailure + 1);
  });

  it('replays /v1/complete in its own shape', async () => {
    const body = { prompt: unique('simple'), temperature: 0.7 };
    const first = await alice.api.post<{ content: string; cost_usd: number }>('/v1/complete', body, keyed('sync-simple'));
    expect(first.status).toBe(200);
    expect(first.body.cost_usd).toBeGreaterThan(0);
    const before = await charged(alice);
    const again = await alice.api.post('/v1/complete', body, keyed('sync-simple'));
    expect(again).toMatchObject({ status: 200, body: first.body });
    expect(Object.keys(again.body as object).sort()).toEqual(['cached', 'content', 'cost_usd', 'model', 'tokens']);
    expect(replayed(again)).toBe('true');
    expect(cost(again)).toBe('0');
    expect(again.headers.get('x-gateway-model')).toBe(first.headers.get('x-gateway-model'));
    expect(gw.stub.hits).toBe(1);
    expect(await charged(alice)).toEqual(before);
  });

  it('replays a completed stream as the same stream; a stream cut short is not stored, and its retry runs', async () => {
    const body = chat(unique('one two three four five six'), { stream: true });
    const first = await alice.api.post<string>('/v1/chat/completions', body, keyed('sync-stream'));
    expect(first.status).toBe(200);
    expect(first.body).toMatch(/data: \[DONE\]\n\n$/);
    const before = await charged(alice);
    const again = await alice.api.post<string>('/v1/chat/completions', body, keyed('sync-stream'));
    expect(again.status).toBe(200);
    expect(again.headers.get('content-type')).toContain('text/event-stream');
    expect(again.body).toBe(first.body);
    expect(replayed(again)).toBe('true');
    expect(cost(again)).toBe('0');
    expect(gw.stub.hits).toBe(1);
    expect(await charged(alice)).toEqual(before);

    const cutBody = chat(unique('one two three four five six'), { stream: true });
    gw.stub.configure({ cutAfterChunks: 2 });
    const cut = await alice.api.post<string>('/v1/chat/completions', cutBody, keyed('sync-stream-cut'));
    expect(cut.body).toContain('"error"');
    gw.stub.configure({});
    const retry = await alice.api.post<string>('/v1/chat/completions', cutBody, keyed('sync-stream-cut'));
    expect(retry.body).not.toContain('"error"');
    expect(replayed(retry)).toBeNull();
    expect(gw.stub.hits).toBe(3);
  });

  it('forgets a key after 24 hours: the same call runs and is charged again, another body is accepted', async () => {
    const body = chat(unique('day'));
    const first = await alice.api.post('/v1/chat/completions', body, keyed('sync-day'));
    clock.advance(IDEMPOTENCY_WINDOW_MS - 1000);
    expect(replayed(await alice.api.post('/v1/chat/completions', body, keyed('sync-day')))).toBe('true');
    clock.advance(2000);
    const later = await alice.api.post('/v1/chat/completions', body, keyed('sync-day'));
    expect(later.status).toBe(200);
    expect(replayed(later)).toBeNull();
    expect(Number(cost(later))).toBeGreaterThan(0);
    expect(later.body).not.toEqual(first.body);
    expect(gw.stub.hits).toBe(2);
    clock.advance(IDEMPOTENCY_WINDOW_MS);
    expect((await alice.api.post('/v1/chat/completions', chat(unique('next day')), keyed('sync-day'))).status).toBe(200);
  });

  it('takes over a claim its process left running, once it is older than a call can last', async () => {
    const body = chat(unique('orphan'));
    // What a process that died mid-call leaves behind.
    await gw.gateway.app.get(DataSource).query(
      `INSERT INTO idempotency_keys (user_id, idempotency_key, body_hash, state, claim_id, request_id, created_at, updated_at)
         VALUES ($1, 'sync-orphan', $2, 'running', gen_random_uuid(), 'dead-request', $3, $3)`,
      [alice.userId, submissionHash('chat', undefined, body), clock.now()],
    );
    expect((await alice.api.post<ErrorBody>('/v1/chat/completions', body, keyed('sync-orphan'))).body).toMatchObject({
      error: { code: 'request_in_progress' },
    });
    clock.advance(abandonedAfterMs(gw.config) + 1);
    const taken = await alice.api.post('/v1/chat/completions', body, keyed('sync-orphan'));
    expect(taken.status).toBe(200);
    expect(replayed(taken)).toBeNull();
    expect(gw.stub.hits).toBe(1);
    expect(await alice.api.post('/v1/chat/completions', body, keyed('sync-orphan'))).toMatchObject({ status: 200, body: taken.body });
    expect(gw.stub.hits).toBe(1);
  });
});
