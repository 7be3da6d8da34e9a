import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditEventDto, AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface JobBody {
  id: string;
  status: 'queued' | 'running' | 'completed' | 'failed';
  result: { choices: Array<{ message: { content: string } }> } | null;
  error: { code: string } | null;
  attempts: number;
}

const ASYNC = { prefer: 'respond-async', 'cache-control': 'no-store' };
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

async function finished(tenant: Tenant, id: string): Promise<JobBody> {
  return pollUntil(
    async () => {
      const res = await tenant.api.get<JobBody>(`/v1/jobs/${id}`);
      expect(['completed', 'failed']).toContain(res.body.status);
      return res.body;
    },
    20_000,
    50,
  );
}

/** An upstream whose every answer carries U+0000 in its content, counting its calls (each one charged). */
async function startNulUpstream(): Promise<{ url: string; hits: () => number; close(): Promise<void> }> {
  let hits = 0;
  const server: Server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      if (!req.url?.endsWith('/chat/completions')) {
        res.writeHead(404, { 'content-type': 'application/json' }).end('{}');
        return;
      }
      hits += 1;
      const { model } = JSON.parse(body) as { model: string };
      res.writeHead(200, { 'content-type': 'application/json' }).end(
        JSON.stringify({
          id: `c${hits}`,
          object: 'chat.completion',
          created: 1,
          model,
          choices: [{ index: 0, message: { role: 'assistant', content: 'before\u0000after' }, finish_reason: 'stop' }],
          usage: { prompt_tokens: 10, completion_tokens: 10, total_tokens: 20 },
        }),
      );
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}/v1`, hits: () => hits, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

describe('a job whose completion PostgreSQL jsonb cannot hold as sent (U+0000)', () => {
  let upstream: Awaited<ReturnType<typeof startNulUpstream>>;
  let gw: TestGateway;

  beforeAll(async () => {
    upstream = await startNulUpstream();
    gw = await startTestGateway({
      db: 'postgres',
      env: { ...NO_RATE_LIMITS, OPENROUTER_BASE_URL: upstream.url, UPSTREAM_RETRY_ATTEMPTS: '1', JOBS_BACKOFF_MS: '20', JOBS_BACKOFF_MAX_MS: '50' },
    });
  });
  afterAll(async () => {
    await gw?.close();
    await upstream?.close();
  });

  it('completes with U+FFFD in place of U+0000, after one upstream call (charged once)', async () => {
    const alice = await gw.tenants.create();
    const submit = await alice.api.post<JobBody>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'x' }] }, ASYNC);
    expect(submit.status).toBe(202);
    const job = await finished(alice, submit.body.id);
    expect(job).toMatchObject({ status: 'completed', attempts: 1, error: null });
    expect(job.result?.choices[0]?.message.content).toBe('before\uFFFDafter');
    expect(upstream.hits()).toBe(1);
  });

  it('refuses to queue a request whose body holds U+0000 with a 400 naming it, not a 500 from the insert', async () => {
    const alice = await gw.tenants.create();
    const submit = await alice.api.post<{ error: { code: string; param: string; message: string } }>(
      '/v1/chat/completions',
      { model: 'auto', messages: [{ role: 'user', content: 'a\u0000b' }] },
      ASYNC,
    );
    expect(submit.status).toBe(400);
    expect(submit.body.error).toMatchObject({ code: 'invalid_value', param: 'messages' });
    expect(submit.body.error.message).toContain('U+0000');
    expect(upstream.hits()).toBe(1);
  });
});

/** An upstream whose every answer ends in a lone surrogate escape (an emoji cut in half, as Python's json.dumps can send), counting its calls. */
async function startLoneSurrogateUpstream(): Promise<{ url: string; hits: () => number; close(): Promise<void> }> {
  let hits = 0;
  const server: Server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString()));
    req.on('end', () => {
      if (!req.url?.endsWith('/chat/completions')) {
        res.writeHead(404, { 'content-type': 'application/json' }).end('{}');
        return;
      }
      hits += 1;
      const { model } = JSON.parse(body) as { model: string };
      // Written as text: the escape \ud83d with no low surrogate after it.
      res
        .writeHead(200, { 'content-type': 'application/json' })
        .end(
          `{"id":"c${hits}","object":"chat.completion","created":1,"model":${JSON.stringify(model)},` +
            `"choices":[{"index":0,"message":{"role":"assistant","content":"smile \\ud83d"},"finish_reason":"length"}],` +
            `"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}`,
        );
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}/v1`, hits: () => hits, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

describe.each(DB_KINDS)('a completion or request holding a lone surrogate, which PostgreSQL jsonb cannot hold (%s)', (kind) => {
  let upstream: Awaited<ReturnType<typeof startLoneSurrogateUpstream>>;
  let gw: TestGateway;
  const chat = (content: string) => ({ model: 'auto', messages: [{ role: 'user', content }] });
  type Completion = { choices: Array<{ message: { content: string } }> };

  beforeAll(async () => {
    upstream = await startLoneSurrogateUpstream();
    gw = await startTestGateway({
      db: kind,
      env: { ...NO_RATE_LIMITS, OPENROUTER_BASE_URL: upstream.url, UPSTREAM_RETRY_ATTEMPTS: '1', JOBS_BACKOFF_MS: '20', JOBS_BACKOFF_MAX_MS: '50' },
    });
  });
  afterAll(async () => {
    await gw?.close();
    await upstream?.close();
  });

  it('completes the job with U+FFFD in place of the lone surrogate, after one upstream call (charged once), as the sync call answers', async () => {
    const alice = await gw.tenants.create();
    const sync = await alice.api.post<Completion>('/v1/chat/completions', chat('x'), { 'cache-control': 'no-store' });
    expect(sync.status).toBe(200);
    expect(sync.body.choices[0]?.message.content).toBe('smile \ud83d');

    const before = upstream.hits();
    const submit = await alice.api.post<JobBody>('/v1/chat/completions', chat('x'), ASYNC);
    expect(submit.status).toBe(202);
    const job = await finished(alice, submit.body.id);
    expect(job).toMatchObject({ status: 'completed', attempts: 1, error: null });
    expect(job.result?.choices[0]?.message.content).toBe('smile \uFFFD');
    expect(upstream.hits() - before).toBe(1);
  });

  it('refuses to queue a request whose message holds a lone surrogate with a 400 saying why (the sync call forwards it as sent)', async () => {
    const alice = await gw.tenants.create();
    expect((await alice.api.post('/v1/chat/completions', chat('cut \ud83d'), { 'cache-control': 'no-store' })).status).toBe(200);
    const before = upstream.hits();
    const submit = await alice.api.post<{ error: { code: string; param: string; message: string } }>('/v1/chat/completions', chat('cut \ud83d'), ASYNC);
    expect(submit.status).toBe(400);
    expect(submit.body.error).toMatchObject({ code: 'invalid_value', param: 'messages' });
    expect(submit.body.error.message).toContain('surrogate');
    // A whole pair is fine.
    const pair = await alice.api.post<JobBody>('/v1/chat/completions', chat('whole \u{1F600}'), ASYNC);
    expect(pair.status).toBe(202);
    expect(await finished(alice, pair.body.id)).toMatchObject({ status: 'completed' });
    expect(upstream.hits() - before).toBe(1);
  });

  it('replays a keyed sync answer holding a lone surrogate as it was sent, without a second upstream call', async () => {
    const alice = await gw.tenants.create();
    const headers = { 'cache-control': 'no-store', 'idempotency-key': 'lone-surrogate-answer' };
    const before = upstream.hits();
    const first = await alice.api.post<Completion>('/v1/chat/completions', chat('x'), headers);
    expect(first.status).toBe(200);
    expect(first.body.choices[0]?.message.content).toBe('smile \ud83d');
    const again = await pollUntil(async () => {
      const res = await alice.api.post<Completion>('/v1/chat/completions', chat('x'), headers);
      expect(res.headers.get('idempotent-replayed')).toBe('true');
      return res;
    });
    expect(again.status).toBe(200);
    expect(again.body).toEqual(first.body);
    expect(upstream.hits() - before).toBe(1);
  });
});

describe('an async submit routing refuses', () => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres', env: { ...NO_RATE_LIMITS, AUDIT_FLUSH_MS: '20' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  // Before, a submit did not route: it was accepted (202) and its job failed on its first try with
  // the error a sync call gets at once. The run-time refusal (the table changed after the submit)
  // is covered by jobs-processor.int-spec.ts ("audits a try the pipeline refused …").
  it('is answered as the sync call is (400 model_not_allowed), leaves no job and one audit row, and frees its idempotency-key', async () => {
    const alice = await gw.tenants.create();
    const table = (await gw.admin.get<{ version: number; default_task_type: string; rules: Array<{ model: string; fallbacks: string[] }> }>('/admin/routing'))
      .body;
    const allowed = [...new Set(table.rules.flatMap((r) => [r.model, ...r.fallbacks]))];
    const put = await gw.admin.put<{ version: number }>('/admin/routing', {
      version: table.version,
      default_task_type: table.default_task_type,
      rules: table.rules,
      allowed_models: allowed,
    });
    expect(put.status).toBe(200);
    const body = { model: 'not/allowed', messages: [{ role: 'user', content: 'x' }] };
    // The table is in effect once a sync call is refused with it.
    const sync = await pollUntil(async () => {
      const res = await alice.api.post<{ error: { code: string; param: string | null } }>('/v1/chat/completions', body);
      expect(res.status).toBe(400);
      return res.body.error;
    });
    expect(sync.code).toBe('model_not_allowed');
    const jobsBefore = (await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue')).body.counts;

    const submit = await alice.api.post<{ error: { code: string; param: string | null } }>('/v1/chat/completions', body, { ...ASYNC, 'idempotency-key': 'refused-then-allowed' });
    expect(submit.status).toBe(400);
    expect(submit.body.error).toEqual(sync);
    const complete = await alice.api.post<{ error: { code: string } }>('/v1/complete', { prompt: 'x', model: 'not/allowed' }, ASYNC);
    expect(complete.status).toBe(400);
    expect(complete.body.error.code).toBe('model_not_allowed');
    expect((await gw.admin.get<{ counts: Record<string, number> }>('/admin/queue')).body.counts).toEqual(jobsBefore);

    const rows = await pollUntil(async () => {
      const found = (await gw.admin.get<AuditListDto>('/admin/audit?action=POST%20/v1/chat/completions&limit=500')).body.data.filter(
        (e: AuditEventDto) => e.actor_user_id === alice.userId && e.status === 400,
      );
      // The sync refusal and the refused submit: one row each.
      expect(found).toHaveLength(2);
      return found;
    });
    expect(rows.map((r) => r.details)).toContainEqual(expect.objectContaining({ error: expect.objectContaining({ code: 'model_not_allowed' }) }));

    // The refused submit left its key unused: once the model is allowed, the same key runs the job.
    const reopened = await gw.admin.put('/admin/routing', {
      version: put.body.version,
      default_task_type: table.default_task_type,
      rules: table.rules,
      allowed_models: [...allowed, 'not/allowed'],
    });
    expect(reopened.status).toBe(200);
    await pollUntil(async () => expect((await alice.api.post('/v1/chat/completions', body)).status).toBe(200));
    const again = await alice.api.post<JobBody>('/v1/chat/completions', body, { ...ASYNC, 'idempotency-key': 'refused-then-allowed' });
    expect(again.status).toBe(202);
    expect(await finished(alice, again.body.id)).toMatchObject({ status: 'completed' });
  });
});
