import type OpenAI from 'openai';
import pg from 'pg';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import type { AuditEventDto, AuditListDto, AuditVerifyDto } from '../../src/audit/admin/audit-admin.dto.js';
import { AuditRepository } from '../../src/audit/audit.repository.js';
import { AuditService } from '../../src/audit/audit.service.js';
import { openDatabase } from '../../src/database/data-source.js';
import { hashApiKey } from '../../src/identity/api-key.js';
import { createPostgresDatabase } from '../support/databases.js';
import { ApiClient, pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

const UPSTREAM_SECRET = 'sk-test-upstream-secret';
const FAST = { AUDIT_FLUSH_MS: '20', UPSTREAM_RETRY_BASE_MS: '5', UPSTREAM_RETRY_MAX_DELAY_MS: '10', UPSTREAM_RETRY_ATTEMPTS: '1' };

interface ErrorBody {
  error: { code: string; param: string | null; type: string };
}

async function auditEvents(gw: TestGateway, query: Record<string, string>): Promise<AuditEventDto[]> {
  const res = await gw.admin.get<AuditListDto>(`/admin/audit?${new URLSearchParams({ limit: '500', ...query }).toString()}`);
  expect(res.status).toBe(200);
  return res.body.data;
}

/** Events are written by the batched writer shortly after the response: poll for them. */
function eventually(gw: TestGateway, query: Record<string, string>, match: (e: AuditEventDto) => boolean): Promise<AuditEventDto> {
  return pollUntil(async () => {
    const found = (await auditEvents(gw, query)).find(match);
    if (!found) throw new Error(`no audit event for ${JSON.stringify(query)} yet`);
    return found;
  });
}

describe('audit trail over HTTP (PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  let adminIds: { userId: string; keyId: string };
  const secrets: string[] = [UPSTREAM_SECRET];

  beforeAll(async () => {
    gw = await startTestGateway({ env: FAST });
    alice = await gw.tenants.create();
    secrets.push(gw.adminKey, alice.key);
    const [row] = await gw.gateway.app
      .get(DataSource)
      .query<Array<{ id: string; user_id: string }>>('SELECT id, user_id FROM api_keys WHERE key_hash = $1', [hashApiKey(gw.adminKey)]);
    adminIds = { userId: row.user_id, keyId: row.id };
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('records admin changes: actor, route pattern, target, status, redacted body, and a created key by id and prefix only', async () => {
    const created = await eventually(gw, { action: 'POST /admin/keys' }, (e) => e.target_id === alice.keyId);
    expect(created).toMatchObject({
      actor_user_id: adminIds.userId,
      actor_key_id: adminIds.keyId,
      actor_role: 'admin',
      target_type: 'keys',
      status: 201,
      details: { body: { user_id: alice.userId }, result: { id: alice.keyId, prefix: alice.key.slice(0, 10) } },
    });
    expect(created.request_id).toBeTruthy();
    expect(JSON.stringify(created)).not.toContain(alice.key);

    const renamed = await gw.admin.patch(`/admin/departments/${alice.departmentId}`, { name: `renamed-${alice.departmentId}` });
    expect(renamed.status).toBe(200);
    const patch = await eventually(gw, { action: 'PATCH /admin/departments/:id' }, (e) => e.target_id === alice.departmentId);
    expect(patch).toMatchObject({ status: 200, target_type: 'departments', details: { body: { name: `renamed-${alice.departmentId}` } } });

    // A key chosen by the caller is not a field keys take: refused (400), and its refusal is
    // audited without the would-be secret.
    const chosen = await gw.admin.post<ErrorBody>('/admin/keys', { user_id: alice.userId, name: 'spare', key: 'gh-chosen-by-the-caller-0123456789' });
    expect(chosen.status).toBe(400);
    expect(chosen.body.error).toMatchObject({ code: 'invalid_value', param: 'key' });
    secrets.push('gh-chosen-by-the-caller-0123456789');
    const refused = await eventually(gw, { action: 'POST /admin/keys' }, (e) => e.status === 400);
    expect(refused.details.body).toMatchObject({ name: 'spare', key: '[redacted]' });

    const spare = await gw.admin.post<{ id: string; key: string }>('/admin/keys', { user_id: alice.userId, name: 'spare' });
    secrets.push(spare.body.key);
    const revoke = await gw.admin.delete(`/admin/keys/${spare.body.id}`);
    expect(revoke.status).toBe(200);
    const revoked = await eventually(gw, { action: 'DELETE /admin/keys/:id' }, (e) => e.target_id === spare.body.id);
    expect(revoked).toMatchObject({ status: 200, actor_user_id: adminIds.userId });
    const spareCreated = await eventually(gw, { action: 'POST /admin/keys' }, (e) => e.target_id === spare.body.id);
    expect(spareCreated.details.body).toMatchObject({ name: 'spare' });
  });

  it('records failed admin attempts and authentication failures on /admin (key prefix only), but not reads', async () => {
    const bad = await gw.admin.post<ErrorBody>('/admin/users', { name: 'mallory', department_id: alice.departmentId, role: 'root' });
    expect(bad.status).toBe(400);
    const failed = await eventually(gw, { action: 'POST /admin/users' }, (e) => e.status === 400);
    expect(failed).toMatchObject({
      actor_user_id: adminIds.userId,
      details: { body: { name: 'mallory', role: 'root' }, error: { code: 'invalid_value', param: 'role' } },
    });

    const forgedKey = 'gh-forged0000000000000000000000000000000000';
    secrets.push(forgedKey);
    const forged = new ApiClient(gw.url, forgedKey);
    expect((await forged.get('/admin/audit')).status).toBe(401);
    const unauthenticated = await eventually(gw, { action: 'GET /admin/audit' }, (e) => e.status === 401);
    expect(unauthenticated).toMatchObject({ actor_user_id: null, actor_key_id: null, details: { key_prefix: forgedKey.slice(0, 10), auth: 'invalid_key' } });
    expect((await eventually(gw, { actor: forgedKey.slice(0, 10) }, () => true)).status).toBe(401);

    expect((await new ApiClient(gw.url, undefined).post('/admin/departments', { name: 'nokey' })).status).toBe(401);
    const missing = await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.status === 401);
    expect(missing.details).toMatchObject({ key_prefix: null, auth: 'missing_key' });

    expect((await alice.api.post('/admin/departments', { name: 'not-allowed' })).status).toBe(403);
    const forbidden = await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.status === 403);
    expect(forbidden).toMatchObject({ actor_user_id: alice.userId, actor_key_id: alice.keyId, actor_role: 'user', details: { auth: 'forbidden' } });

    // Probing for admin routes that do not exist is recorded under the path that was tried.
    expect((await new ApiClient(gw.url, undefined).post('/admin/backdoor?x=1', {})).status).toBe(404);
    const probe = await eventually(gw, { action: 'POST /admin/backdoor' }, () => true);
    expect(probe).toMatchObject({ status: 404, actor_user_id: null, target_type: 'backdoor', details: { query: { x: '1' }, key_prefix: null } });

    // Successful reads are not changes: nothing recorded for them.
    expect((await gw.admin.get('/admin/departments')).status).toBe(200);
    await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.status === 403);
    expect(await auditEvents(gw, { action: 'GET /admin/departments' })).toEqual([]);
  });

  // Before, an answer over 64 KiB was not read: a large routing table's change left its version out.
  it('records the version a large routing table change made, however long its answer', async () => {
    const table = (await gw.admin.get<{ version: number; default_task_type: string; rules: Array<Record<string, unknown>> }>('/admin/routing')).body;
    const fallbacks = Array.from({ length: 10 }, (_, i) => `vendor-${i}/${'model-with-a-long-name-'.repeat(4)}${i}`);
    const rules = [...table.rules, ...Array.from({ length: 150 }, (_, i) => ({ task_type: `bulk-${i}`, model: 'openai/gpt-4o-mini', fallbacks }))];
    const put = await gw.admin.put<{ version: number }>('/admin/routing', { version: table.version, default_task_type: table.default_task_type, rules });
    expect(put.status).toBe(200);
    expect(JSON.stringify(put.body).length).toBeGreaterThan(64 * 1024);
    const row = await eventually(gw, { action: 'PUT /admin/routing' }, (e) => e.status === 200 && (e.details.result as { version?: string } | undefined)?.version === String(put.body.version));
    expect(row.target_id).toBe(String(put.body.version));
    // Back to the seeded table for the tests after this one.
    const now = (await gw.admin.get<{ version: number }>('/admin/routing')).body;
    expect((await gw.admin.put('/admin/routing', { version: now.version, default_task_type: table.default_task_type, rules: table.rules })).status).toBe(200);
  });

  it('records admin changes and refused requests whose path is spelled with percent escapes, which the router decodes', async () => {
    // `/%61dmin/departments` is /admin/departments to the router: the change is made, and must be audited.
    const made = await gw.admin.post<{ id: string }>('/%61dmin/departments', { name: 'escaped-path' });
    expect(made.status).toBe(201);
    const change = await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.target_id === made.body.id);
    expect(change).toMatchObject({ status: 201, actor_user_id: adminIds.userId, details: { body: { name: 'escaped-path' } } });

    const anonymous = new ApiClient(gw.url, undefined);
    const nokey = await anonymous.post('/%61dmin/departments', { name: 'escaped-nokey' });
    expect(nokey.status).toBe(401);
    const nokeyRow = await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.request_id === nokey.headers.get('x-request-id'));
    expect(nokeyRow).toMatchObject({ status: 401, details: { body_fields: ['name'] } });
    expect((await anonymous.post('/%761/chat/completions', { messages: [{ role: 'user', content: 'x' }] })).status).toBe(401);
    const refused = await eventually(gw, { action: 'POST /v1/chat/completions' }, (e) => e.status === 401 && e.details.auth === 'missing_key');
    expect(refused.actor_user_id).toBeNull();
  });

  it('records every completion request: door, route, routing version, model, cache, attempts, outcome', async () => {
    const { response } = await alice.openai.chat.completions
      .create({
        model: 'auto',
        messages: [{ role: 'user', content: 'audit me' }],
        user: 'end-user-42',
        task_type: 'code',
      } as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
      .withResponse();
    const requestId = response.headers.get('x-request-id')!;
    const ok = await eventually(gw, { action: 'completion' }, (e) => e.request_id === requestId);
    expect(ok).toMatchObject({
      actor_user_id: alice.userId,
      actor_key_id: alice.keyId,
      actor_role: 'user',
      target_type: 'model',
      target_id: 'anthropic/claude-3.5-sonnet',
      status: 200,
      details: {
        door: 'chat',
        task_type: 'code',
        rule: 'code',
        routing_version: expect.any(Number),
        model: 'anthropic/claude-3.5-sonnet',
        cache: expect.stringMatching(/^(hit|miss|bypass)$/),
        attempts: [expect.objectContaining({ model: 'anthropic/claude-3.5-sonnet', ok: true, status: 200 })],
        outcome: 'ok',
        end_user: 'end-user-42',
        key_prefix: alice.key.slice(0, 10),
        department_id: alice.departmentId,
      },
    });
    expect(ok.details).toHaveProperty('cost_nanos');

    const stream = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'stream audit' }], stream: true }),
    });
    await stream.text();
    const streamed = await eventually(gw, { action: 'completion' }, (e) => e.request_id === stream.headers.get('x-request-id'));
    expect(streamed).toMatchObject({ status: 200, details: { door: 'chat', outcome: 'ok', model: 'openai/gpt-4o-mini' } });

    const simple = await alice.api.post('/v1/complete', { prompt: 'simple audit' });
    expect(simple.status).toBe(200);
    const viaComplete = await eventually(gw, { action: 'completion' }, (e) => e.request_id === simple.headers.get('x-request-id'));
    expect(viaComplete.details).toMatchObject({ door: 'complete', outcome: 'ok' });

    gw.stub.configure({ status: 500 });
    const failed = await alice.api.post<ErrorBody>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'fail' }] });
    expect(failed.status).toBe(502);
    const failure = await eventually(gw, { action: 'completion' }, (e) => e.request_id === failed.headers.get('x-request-id'));
    expect(failure).toMatchObject({ status: 502, details: { model: null, outcome: failed.body.error.code } });
    expect((failure.details.attempts as Array<{ ok: boolean }>).every((a) => !a.ok)).toBe(true);
  });

  // Rows are hash-chained and cannot be edited later: a key pasted into the `user` label must be
  // masked before it is stored.
  it('records a caller key sent as the end-user label masked, never the key', async () => {
    const carol = await gw.tenants.create();
    secrets.push(carol.key);
    const res = await carol.api.post('/v1/chat/completions', { model: 'auto', user: carol.key, messages: [{ role: 'user', content: 'key in user' }] });
    expect(res.status).toBe(200);
    const row = await eventually(gw, { action: 'completion' }, (e) => e.request_id === res.headers.get('x-request-id'));
    expect(row.details.end_user).toBe('[redacted]');
    expect(JSON.stringify(row)).not.toContain(carol.key);
  });

  it('records a JSON call the client left before the answer as client_closed (499), not as an upstream failure', async () => {
    gw.stub.configure({ latencyMs: 2000 });
    const requestId = `left-early-${Date.now()}`;
    const leaving = new AbortController();
    const pending = fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json', 'x-request-id': requestId },
      body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: `leaving ${requestId}` }] }),
      signal: leaving.signal,
    });
    await pollUntil(() => expect(gw.stub.hits).toBe(1));
    leaving.abort();
    await expect(pending).rejects.toThrow();
    const left = await eventually(gw, { action: 'completion' }, (e) => e.request_id === requestId);
    expect(left).toMatchObject({ status: 499, details: { outcome: 'client_closed', attempts: [{ failure: 'client_closed' }] } });
  });

  // Before, an accepted async submit left no row under the caller's request id (only its job's
  // tries did, under job-<id>-<try>).
  it('records an accepted async submit under its request id, with its job, and a replayed one marked so', async () => {
    const submit = (requestId: string) =>
      alice.api.post<{ id: string }>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'audit the submit' }] }, {
        prefer: 'respond-async',
        'idempotency-key': 'audit-submit-1',
        'x-request-id': requestId,
      });
    const first = await submit(`submit-${Date.now()}`);
    expect(first.status).toBe(202);
    const firstId = first.headers.get('x-request-id') ?? '';
    const row = await eventually(gw, { action: 'POST /v1/chat/completions' }, (e) => e.request_id === firstId);
    expect(row).toMatchObject({ status: 202, target_type: 'job', target_id: first.body.id, actor_user_id: alice.userId, details: { result: { id: first.body.id } } });
    expect(row.details.replayed).toBeUndefined();
    const again = await submit(`resubmit-${Date.now()}`);
    expect(again.status).toBe(202);
    const againId = again.headers.get('x-request-id') ?? '';
    const replayed = await eventually(gw, { action: 'POST /v1/chat/completions' }, (e) => e.request_id === againId);
    expect(replayed).toMatchObject({ status: 202, target_id: first.body.id, details: { replayed: true } });
  });

  it('records a stream the client left while the next event was awaited as client_closed, not as an aborted upstream', async () => {
    gw.stub.configure({ chunkDelayMs: 300, completionTokens: 20 });
    const requestId = `left-mid-stream-${Date.now()}`;
    const leaving = new AbortController();
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json', 'x-request-id': requestId },
      body: JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content: `leaving ${requestId}` }] }),
      signal: leaving.signal,
    });
    const reader = res.body!.getReader();
    await reader.read();
    leaving.abort();
    const left = await eventually(gw, { action: 'completion' }, (e) => e.request_id === requestId);
    expect(left).toMatchObject({ status: 200, details: { outcome: 'client_closed', attempts: [{ failure: 'client_closed' }] } });
  });

  it('records every refused /v1 request once: bad key, bad body, too large, over budget, over the rate limit', async () => {
    const bob = await gw.tenants.create();
    secrets.push(bob.key);
    const ask = (client: ApiClient, body: unknown = { model: 'auto', messages: [{ role: 'user', content: 'refuse me' }] }) =>
      client.post<ErrorBody>('/v1/chat/completions', body);
    const rowsFor = async (requestId: string | null): Promise<AuditEventDto[]> => {
      expect(requestId).toBeTruthy();
      await eventually(gw, {}, (e) => e.request_id === requestId);
      return (await auditEvents(gw, {})).filter((e) => e.request_id === requestId);
    };

    // Before authentication: the key prefix only, never the key.
    const forgedKey = 'gh-notakey000000000000000000000000000000000';
    secrets.push(forgedKey);
    const unknownKey = await ask(new ApiClient(gw.url, forgedKey));
    expect(unknownKey.status).toBe(401);
    const [unauthenticated, ...more401] = await rowsFor(unknownKey.headers.get('x-request-id'));
    expect(more401).toEqual([]);
    expect(unauthenticated).toMatchObject({
      action: 'POST /v1/chat/completions',
      status: 401,
      actor_user_id: null,
      details: { key_prefix: forgedKey.slice(0, 10), auth: 'invalid_key', error: { code: 'invalid_api_key' } },
    });

    // A body the door refuses, and one too large to read.
    const badBody = await ask(bob.api, { messages: 'not a list' });
    expect(badBody.status).toBe(400);
    const [invalid] = await rowsFor(badBody.headers.get('x-request-id'));
    expect(invalid).toMatchObject({ status: 400, actor_key_id: bob.keyId, details: { error: { code: badBody.body.error.code, param: 'messages' } } });
    const huge = await ask(bob.api, { model: 'auto', messages: [{ role: 'user', content: 'x'.repeat(5 * 1024 * 1024) }] });
    expect(huge.status).toBe(413);
    expect((await rowsFor(huge.headers.get('x-request-id')))[0]).toMatchObject({ status: 413, action: 'POST /v1/chat/completions' });

    // Refused by the pipeline: recorded as a completion with the refusal as its outcome, once.
    expect((await gw.admin.put(`/admin/budgets/users/${bob.userId}`, { limit_usd: 0.000000001, period: 'total' })).status).toBe(200);
    const broke = await ask(bob.api);
    expect(broke.status).toBe(402);
    const [overBudget, ...more402] = await rowsFor(broke.headers.get('x-request-id'));
    expect(more402).toEqual([]);
    expect(overBudget).toMatchObject({ action: 'completion', status: 402, actor_key_id: bob.keyId, details: { outcome: 'budget_exceeded', attempts: [] } });
    expect(gw.stub.hits).toBe(0);

    expect((await gw.admin.put(`/admin/rate-limits/keys/${bob.keyId}`, { requests_per_minute: 1 })).status).toBe(200);
    let limited = await ask(bob.api);
    for (let i = 0; i < 5 && limited.status !== 429; i++) limited = await ask(bob.api);
    expect(limited.status).toBe(429);
    const [overLimit, ...more429] = await rowsFor(limited.headers.get('x-request-id'));
    expect(more429).toEqual([]);
    expect(overLimit).toMatchObject({ action: 'completion', status: 429, details: { outcome: 'rate_limit_exceeded' } });
  });

  it('records a call the upstream fails once, streamed or not', async () => {
    gw.stub.configure({ status: 503 });
    for (const stream of [false, true]) {
      const res = await alice.api.post<ErrorBody>('/v1/chat/completions', { model: 'auto', stream, messages: [{ role: 'user', content: `fail ${String(stream)}` }] });
      expect(res.status).toBe(502);
      const requestId = res.headers.get('x-request-id');
      await eventually(gw, {}, (e) => e.request_id === requestId);
      // The writer stores events in order: one written after this call's proves nothing else of it is on its way.
      const marker = await alice.api.post('/v1/chat/completions', { model: 'auto', messages: 'not a list' });
      await eventually(gw, {}, (e) => e.request_id === marker.headers.get('x-request-id'));
      const rows = (await auditEvents(gw, {})).filter((e) => e.request_id === requestId);
      expect(rows.map((e) => [e.action, e.status])).toEqual([['completion', 502]]);
    }
  });

  it('pages newest first with next_cursor, filters, and names a bad query parameter', async () => {
    const all = await auditEvents(gw, {});
    expect(all.length).toBeGreaterThan(5);
    expect(all.map((e) => e.seq)).toEqual([...all.map((e) => e.seq)].sort((a, b) => b - a));

    const walked: number[] = [];
    let cursor: string | null = null;
    do {
      const page: { status: number; body: AuditListDto } = await gw.admin.get<AuditListDto>(`/admin/audit?limit=2${cursor ? `&cursor=${cursor}` : ''}`);
      expect(page.status).toBe(200);
      expect(page.body.data.length).toBeLessThanOrEqual(2);
      walked.push(...page.body.data.map((e) => e.seq));
      cursor = page.body.next_cursor;
    } while (cursor);
    // Events stored meanwhile sit above the first page; of the rest, none is skipped or repeated.
    expect(walked.filter((s) => s <= all[0].seq)).toEqual(all.map((e) => e.seq));

    const mine = await auditEvents(gw, { actor: alice.userId });
    expect(mine.length).toBeGreaterThan(0);
    expect(mine.every((e) => e.actor_user_id === alice.userId)).toBe(true);
    const adminChanges = await auditEvents(gw, { action: 'POST /admin/*' });
    expect(adminChanges.length).toBeGreaterThan(0);
    expect(adminChanges.every((e) => e.action.startsWith('POST /admin/'))).toBe(true);
    const oldest = all.at(-1)!;
    const window = await auditEvents(gw, { from: oldest.at, to: new Date(Date.parse(oldest.at) + 1).toISOString() });
    expect(window.map((e) => e.seq)).toContain(oldest.seq);
    expect(await auditEvents(gw, { from: new Date(Date.now() + 3_600_000).toISOString() })).toEqual([]);

    for (const [query, param] of [
      ['limit=0', 'limit'],
      ['limit=501', 'limit'],
      ['limit=abc', 'limit'],
      ['cursor=abc', 'cursor'],
      ['from=yesterday', 'from'],
      ['from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z', 'from'],
      ['actor=not%20a%20key', 'actor'],
      ['limit=1&limit=2', 'limit'],
    ] as const) {
      const res = await gw.admin.get<ErrorBody>(`/admin/audit?${query}`);
      expect(res.status, query).toBe(400);
      expect(res.body.error, query).toMatchObject({ type: 'invalid_request_error', code: 'invalid_value', param });
    }
    expect((await alice.api.get<ErrorBody>('/admin/audit')).body.error.code).toBe('forbidden');
    expect((await gw.admin.get<ErrorBody>('/admin/audit/verify?from=soon')).body.error.param).toBe('from');
  });

  it('reports the audit buffer in /health/ready', async () => {
    const ready = await gw.admin.get<{ status: string; details: Record<string, { status: string; buffered: number; dropped: number }> }>('/health/ready');
    expect(ready.status).toBe(200);
    expect(ready.body.details.audit).toMatchObject({ status: 'up', buffered: expect.any(Number), dropped: 0 });
  });

  it('never stores a key, the admin key or the upstream key in any audit row', async () => {
    // Everything recorded so far is stored first.
    const expected = (await auditEvents(gw, {})).length;
    await pollUntil(async () =>
      expect((await gw.admin.get<{ details: { audit: { buffered: number } } }>('/health/ready')).body.details.audit.buffered).toBe(0),
    );
    const rows = await gw.gateway.app.get(DataSource).query<Array<{ text: string }>>('SELECT a::text AS text FROM audit_events a');
    expect(rows.length).toBeGreaterThanOrEqual(expected);
    for (const secret of secrets) {
      const leaks = rows.filter((r) => r.text.includes(secret));
      expect(leaks, `a secret starting ${secret.slice(0, 6)} leaked into the audit trail`).toEqual([]);
    }
  });

  it('verifies the chain, and pins a tampered row by its seq', async () => {
    const clean = await gw.admin.get<AuditVerifyDto>('/admin/audit/verify');
    expect(clean.status).toBe(200);
    expect(clean.body).toMatchObject({ ok: true, first_break: null });
    expect(clean.body.checked).toBeGreaterThan(5);

    const [victim] = await auditEvents(gw, { action: 'POST /admin/keys', limit: '1' });
    const ds = gw.gateway.app.get(DataSource);
    await ds.query('ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update');
    await ds.query(`UPDATE audit_events SET details = jsonb_set(details, '{status_note}', '"nothing to see"') WHERE seq = $1`, [victim.seq]);
    await ds.query('ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update');

    const broken = await gw.admin.get<AuditVerifyDto>('/admin/audit/verify');
    expect(broken.body).toMatchObject({ ok: false, first_break: victim.seq });
    const before = await gw.admin.get<AuditVerifyDto>(`/admin/audit/verify?to=${victim.seq - 1}`);
    expect(before.body).toMatchObject({ ok: true, first_break: null });
  });
});

describe('audit on a graceful stop (PostgreSQL)', () => {
  it('flushes every buffered event before the database closes', async () => {
    const pgdb = await createPostgresDatabase();
    try {
      // A flush interval far beyond the test: only the shutdown flush can write these.
      const gw = await startTestGateway({ db: 'postgres', postgresUrl: pgdb.url, env: { ...FAST, AUDIT_FLUSH_MS: '60000' } });
      const bob = await gw.tenants.create();
      await bob.openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'before stop' }] });
      await pollUntil(async () =>
        expect((await gw.admin.get<{ details: { audit: { buffered: number } } }>('/health/ready')).body.details.audit.buffered).toBe(5),
      );
      // A request that finishes while the server drains records after the first shutdown flush:
      // the second one (onApplicationShutdown) must still run before the database closes.
      const audit = gw.gateway.app.get(AuditService);
      const firstFlush = audit.beforeApplicationShutdown.bind(audit);
      audit.beforeApplicationShutdown = () => {
        firstFlush();
        audit.record({ action: 'late', status: 200, details: {} });
      };
      await gw.close();

      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        const rows = await db.dataSource.query<Array<{ action: string; status: number }>>('SELECT action, status FROM audit_events ORDER BY seq');
        expect(rows).toEqual([
          { action: 'bootstrap.create_key', status: null },
          { action: 'POST /admin/departments', status: 201 },
          { action: 'POST /admin/users', status: 201 },
          { action: 'POST /admin/keys', status: 201 },
          { action: 'completion', status: 200 },
          { action: 'late', status: 200 },
        ]);
        expect(await new AuditRepository(db.dataSource).verify({})).toMatchObject({ ok: true, checked: 6 });
      } finally {
        await db.close();
      }
    } finally {
      await pgdb.drop();
    }
  });
});

// Behind an ingress every request comes from it: TRUST_PROXY names it, and the audit shows the client.
describe('the client address behind a proxy (TRUST_PROXY)', () => {
  let trusting: TestGateway;
  let plain: TestGateway;

  beforeAll(async () => {
    [trusting, plain] = await Promise.all([startTestGateway({ env: { ...FAST, TRUST_PROXY: '127.0.0.1' } }), startTestGateway({ env: FAST })]);
  });
  afterAll(async () => {
    await Promise.all([trusting?.close(), plain?.close()]);
  });

  it("records the forwarded client's address only when the proxy it came through is trusted", async () => {
    for (const gw of [trusting, plain]) {
      const name = `forwarded-${Date.now()}`;
      const made = await gw.admin.post<{ id: string }>('/admin/departments', { name }, { 'x-forwarded-for': '203.0.113.7' });
      expect(made.status).toBe(201);
      const row = await eventually(gw, { action: 'POST /admin/departments' }, (e) => e.target_id === made.body.id);
      expect(row.details.ip).toBe(gw === trusting ? '203.0.113.7' : '127.0.0.1');
    }
  });
});

describe('a change whose caller hangs up before the answer (PostgreSQL)', () => {
  let gw: TestGateway;

  /** Sends the request while `table` is locked, so that it waits there until the caller has gone (300 ms). */
  async function leaveWhileLocked(table: string, path: string, headers: Record<string, string>, body: unknown): Promise<void> {
    const blocker = new pg.Client({ connectionString: gw.database.url });
    await blocker.connect();
    try {
      await blocker.query('BEGIN');
      await blocker.query(`LOCK TABLE ${table} IN EXCLUSIVE MODE`);
      const leaving = fetch(`${gw.url}${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...headers },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(300),
      });
      await expect(leaving).rejects.toThrow();
      await blocker.query('COMMIT');
    } finally {
      await blocker.end();
    }
  }

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres', env: FAST });
  });
  afterAll(async () => {
    await gw?.close();
  });

  // Before, the change was made but left no row: the audit was written when the response
  // finished, and a response whose connection is gone never finishes.
  it('is recorded once, with the status of the change it made, marked client_closed', async () => {
    const name = `left-early-${Date.now()}`;
    // Holds the insert until the caller has gone.
    await leaveWhileLocked('departments', '/admin/departments', { authorization: `Bearer ${gw.adminKey}` }, { name });
    const made = await pollUntil(async () => {
      const [row] = await gw.gateway.app.get(DataSource).query<Array<{ id: string }>>('SELECT id FROM departments WHERE name = $1', [name]);
      expect(row).toBeDefined();
      return row;
    });
    const row = await eventually(gw, { action: 'POST /admin/departments' }, (e) => (e.details.body as { name?: string } | undefined)?.name === name);
    expect(row).toMatchObject({ status: 201, target_id: made?.id, details: { client_closed: true } });
    // Exactly one: a later flush does not add another.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect((await auditEvents(gw, { action: 'POST /admin/departments' })).filter((e) => (e.details.body as { name?: string } | undefined)?.name === name)).toHaveLength(1);
  });

  // The same for an async submit: the job exists and will run (and be charged), so its submit
  // must leave a row even though the caller never saw the 202.
  it('records an async submit whose caller left before the 202, with the job it made, once', async () => {
    const alice = await gw.tenants.create();
    const requestId = `submit-left-${Date.now()}`;
    await leaveWhileLocked('jobs', '/v1/chat/completions', { authorization: `Bearer ${alice.key}`, prefer: 'respond-async', 'x-request-id': requestId }, {
      model: 'auto',
      messages: [{ role: 'user', content: 'queued, then nobody waits' }],
    });
    const job = await pollUntil(async () => {
      const [row] = await gw.gateway.app.get(DataSource).query<Array<{ id: string }>>('SELECT id FROM jobs WHERE user_id = $1', [alice.userId]);
      expect(row).toBeDefined();
      return row;
    });
    const row = await eventually(gw, { action: 'POST /v1/chat/completions' }, (e) => e.request_id === requestId);
    expect(row).toMatchObject({ status: 202, target_type: 'job', target_id: job?.id, actor_user_id: alice.userId, details: { client_closed: true } });
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect((await auditEvents(gw, { action: 'POST /v1/chat/completions' })).filter((e) => e.request_id === requestId)).toHaveLength(1);
  });
});

/**
 * A 4 MiB body (BODY_LIMIT_BYTES) costs a caller nothing to send, key or no key. A 401 used to keep
 * it: cut at 500 characters per string and 50 items per level, a 3.8 MB body still left a 3.78 MB
 * row, and ~70 of them buffered through a short outage made the first INSERT after it exceed
 * jsonb's 256 MB on every retry: no audit row was written again until a restart.
 */
describe('audit rows of requests carrying megabytes of body (PostgreSQL)', () => {
  let pair: ProxiedGateway;

  /** ~3.8 MB that the per-string and per-level cuts keep whole: 50 × 50 × 3 strings of 499 characters. */
  function bigBody(name: string): Record<string, unknown> {
    const s = 'x'.repeat(499);
    return { name, pad: Array.from({ length: 50 }, () => Array.from({ length: 50 }, () => [s, s, s])) };
  }

  async function storedRow(requestId: string | null): Promise<{ details: Record<string, unknown>; bytes: number }> {
    const db = pair.owner.gateway.app.get(DataSource);
    return pollUntil(async () => {
      const [row] = await db.query<Array<{ details: Record<string, unknown>; bytes: number }>>(
        'SELECT details, octet_length(details::text)::int AS bytes FROM audit_events WHERE request_id = $1',
        [requestId],
      );
      expect(row).toBeDefined();
      return row;
    });
  }

  beforeAll(async () => {
    pair = await startGatewayBehindPostgresProxy({ env: { AUDIT_FLUSH_MS: '50' } });
  });
  afterAll(async () => {
    await pair?.close();
  });

  it("keeps only the field names of a body no admin sent, an admin's as its size, and the chain still verifies", async () => {
    const { gw } = pair;
    const anonymous = await new ApiClient(gw.url, undefined).post('/admin/departments', bigBody('anonymous'));
    expect(anonymous.status).toBe(401);
    const alice = await gw.tenants.create();
    const user = await alice.api.post('/admin/departments', bigBody('user'));
    expect(user.status).toBe(403);
    for (const refused of [anonymous, user]) {
      const row = await storedRow(refused.headers.get('x-request-id'));
      expect(row.details).toMatchObject({ body_fields: ['name', 'pad'] });
      expect(row.details.body).toBeUndefined();
      expect(row.bytes).toBeLessThan(1024);
    }

    const admin = await gw.admin.post('/admin/departments', bigBody('admin'));
    expect(admin.status).toBe(400);
    const row = await storedRow(admin.headers.get('x-request-id'));
    expect(row.details.body).toEqual({ '[truncated]': true, bytes: expect.any(Number) as number });
    expect((row.details.body as { bytes: number }).bytes).toBeGreaterThan(3_000_000);
    expect(row.bytes).toBeLessThan(1024);
    expect((await gw.admin.get<AuditVerifyDto>('/admin/audit/verify')).body).toMatchObject({ ok: true, first_break: null });
  });

  it('keeps writing rows after a short outage during which callers without a key sent megabytes of body', async () => {
    const { gw, proxy } = pair;
    await proxy.stop();
    const anonymous = new ApiClient(gw.url, undefined);
    const body = bigBody('outage');
    for (let i = 0; i < 72; i += 1) expect((await anonymous.post('/admin/departments', body)).status).toBe(401);
    await proxy.start();

    const audit = gw.gateway.app.get(AuditService);
    audit.record({ action: 'after_outage', status: 200, details: {} });
    const db = pair.owner.gateway.app.get(DataSource);
    await pollUntil(
      async () => {
        // Now rather than after the writer's backoff (up to 30 s), which grew through the outage.
        await audit.flush();
        const [row] = await db.query<Array<{ n: number }>>("SELECT count(*)::int AS n FROM audit_events WHERE action = 'after_outage'");
        expect(row.n, `audit stats: ${JSON.stringify(audit.stats())}`).toBe(1);
      },
      30_000,
      200,
    );
  });
});
