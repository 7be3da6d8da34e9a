import type { ServerResponse } from 'node:http';
import { connect } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { createLogger } from '../../src/core/logger.js';
import { openDatabase } from '../../src/database/data-source.js';
import { createPostgresDatabase } from '../support/databases.js';
import { ApiClient, answerHeld, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

/** An SSE response read as it arrives, so a test can act while the stream is still going. */
interface OpenStream {
  frames: string[];
  ended: boolean;
  done: Promise<string>;
}

async function openStream(gw: TestGateway, tenant: Tenant, content: string): Promise<OpenStream> {
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content }] }),
  });
  expect(res.status).toBe(200);
  if (!res.body) throw new Error('no body');
  const reader: ReadableStreamDefaultReader<Uint8Array> = res.body.getReader();
  const stream: OpenStream = { frames: [], ended: false, done: Promise.resolve('') };
  const decoder = new TextDecoder();
  stream.done = (async () => {
    let text = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      stream.frames = text.split('\n\n').filter((f) => f.startsWith('data: '));
    }
    stream.ended = true;
    return text;
  })();
  return stream;
}

function contentOf(frames: string[]): string {
  return frames
    .filter((f) => f !== 'data: [DONE]')
    .map((f) => JSON.parse(f.slice('data: '.length)) as { choices?: Array<{ delta?: { content?: string } }> })
    .map((c) => c.choices?.[0]?.delta?.content ?? '')
    .join('');
}

describe('graceful shutdown (SIGTERM path: app.close())', () => {
  let gw: TestGateway | undefined;

  /** The app is closed by the test itself; the stub and the database are cleaned up here. */
  afterEach(async () => {
    if (!gw) return;
    await gw.stub.close();
    await gw.database.drop();
    gw = undefined;
  });

  it('turns readiness 503 at once, lets an in-flight stream finish with [DONE], then stops listening', async () => {
    gw = await startTestGateway({ env: { SHUTDOWN_DRAIN_MS: '30000' } });
    const alice = await gw.tenants.create();
    expect((await fetch(`${gw.url}/health/ready`)).status).toBe(200);
    gw.stub.configure({ chunkDelayMs: 150, completionTokens: 20 });
    const stream = await openStream(gw, alice, 'a slow answer');
    await pollUntil(() => expect(stream.frames.length).toBeGreaterThan(0));

    const closing = gw.gateway.close();
    const ready = await pollUntil(async () => {
      const res = await fetch(`${gw?.url}/health/ready`);
      expect(res.status).toBe(503);
      return (await res.json()) as { status: string; error?: Record<string, unknown>; details: Record<string, { status: string; draining?: boolean }> };
    });
    // The load balancer sees "not ready" while the stream is still being served.
    expect(stream.ended).toBe(false);
    expect(ready.status).toBe('shutting_down');
    expect(ready.details.shutdown).toMatchObject({ status: 'down', draining: true });
    // Still alive while draining: a failing liveness probe would get the pod killed mid-drain.
    expect((await fetch(`${gw.url}/health/live`)).status).toBe(200);

    const text = await stream.done;
    expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true);
    expect(text).not.toContain('"error"');
    expect(contentOf(stream.frames).split(' ')).toHaveLength(20);
    await closing;
    await expect(fetch(`${gw.url}/health/live`)).rejects.toThrow();
  });

  it('says `connection: close` on every answer during the drain, a stream included, so keep-alive clients move to another instance', async () => {
    gw = await startTestGateway({ env: { SHUTDOWN_DRAIN_MS: '20000' } });
    const alice = await gw.tenants.create();
    // A slow stream keeps the drain going while the next requests arrive.
    gw.stub.configure({ chunkDelayMs: 400 });
    const slow = await openStream(gw, alice, 'keeps the drain busy a while');
    const closing = gw.gateway.close();
    const probe = new ApiClient(gw.url, undefined);
    await pollUntil(async () => expect((await probe.get('/health/ready')).status).toBe(503));
    gw.stub.configure({});
    const during = async (body: Record<string, unknown>) => {
      const res = await fetch(`${gw?.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${alice.key}`, 'content-type': 'application/json', 'cache-control': 'no-cache, no-store' },
        body: JSON.stringify({ model: 'auto', ...body }),
      });
      await res.text();
      return { status: res.status, connection: res.headers.get('connection') };
    };
    expect(await during({ messages: [{ role: 'user', content: 'json during drain' }] })).toEqual({ status: 200, connection: 'close' });
    // A stream forced `connection: keep-alive` over the drain's header.
    expect(await during({ stream: true, messages: [{ role: 'user', content: 'stream during drain' }] })).toEqual({ status: 200, connection: 'close' });
    expect(slow.ended).toBe(false);
    await slow.done;
    await closing;
  });

  it('lets an in-flight JSON request finish during the drain, and stores its ledger row and audit event before the database closes', async () => {
    const pgdb = await createPostgresDatabase();
    try {
      // Flush intervals far beyond the test: only the shutdown flushes can store this request's
      // records, which the pipeline writes after the answer has gone out.
      gw = await startTestGateway({
        db: 'postgres',
        postgresUrl: pgdb.url,
        env: { SHUTDOWN_DRAIN_MS: '30000', AUDIT_FLUSH_MS: '60000', BUDGET_FLUSH_MS: '60000' },
      });
      const bob = await gw.tenants.create();
      gw.stub.configure({ latencyMs: 1500 });
      const pending = bob.api.post<{ choices: Array<{ message: { content: string } }> }>('/v1/chat/completions', {
        model: 'auto',
        messages: [{ role: 'user', content: 'take your time' }],
      });
      const stub = gw.stub;
      await pollUntil(() => expect(stub.hits).toBe(1));

      const closing = gw.gateway.close();
      await pollUntil(async () => expect((await fetch(`${gw?.url}/health/ready`)).status).toBe(503));
      const res = await pending;
      expect(res.status).toBe(200);
      expect(res.body.choices[0]?.message.content).toBe('Mock reply to: take your time');
      const requestId = res.headers.get('x-request-id');
      expect(requestId).toBeTruthy();
      await closing;

      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        const ledger = await db.dataSource.query<Array<{ user_id: string; cache: string | null }>>('SELECT user_id, cache FROM usage_ledger WHERE request_id = $1', [requestId]);
        expect(ledger).toEqual([{ user_id: bob.userId, cache: 'miss' }]);
        const audit = await db.dataSource.query<Array<{ action: string; status: number }>>('SELECT action, status FROM audit_events WHERE request_id = $1', [requestId]);
        expect(audit).toEqual([{ action: 'completion', status: 200 }]);
      } finally {
        await db.close();
      }
    } finally {
      await pgdb.drop();
    }
  });

  it('settles a JSON call still running at the drain deadline before the database closes: its reservation is given back, its attempt is in the ledger', async () => {
    const pgdb = await createPostgresDatabase();
    try {
      gw = await startTestGateway({ db: 'postgres', postgresUrl: pgdb.url, env: { SHUTDOWN_DRAIN_MS: '200' } });
      const dave = await gw.tenants.create({ userBudgetUsd: 1 });
      // Far longer than the drain and its grace: only the closing of its connection ends it.
      gw.stub.configure({ latencyMs: 60_000 });
      const requestId = `cut-at-deadline-${dave.userId}`;
      const pending = fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${dave.key}`, 'content-type': 'application/json', 'x-request-id': requestId },
        body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'never answered in time' }] }),
      }).then(
        (res) => res.status,
        () => 'connection closed',
      );
      const stub = gw.stub;
      await pollUntil(() => expect(stub.hits).toBe(1));

      await gw.gateway.close();
      expect(await pending).toBe('connection closed');

      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        // Before the fix the settle reached the writer after its last flush: the lease stayed held
        // (reserved_nanos up) until the sweeper, 10 minutes later, and the ledger had no row.
        const held = await db.dataSource.query<Array<{ n: string }>>('SELECT count(*) AS n FROM budget_reservations WHERE user_id = $1', [dave.userId]);
        expect(held).toEqual([{ n: '0' }]);
        const budget = await db.dataSource.query<Array<{ reserved_nanos: string }>>(
          "SELECT reserved_nanos FROM budgets WHERE scope = 'user' AND scope_id = $1",
          [dave.userId],
        );
        expect(budget).toEqual([{ reserved_nanos: '0' }]);
        const ledger = await db.dataSource.query<Array<{ cost_nanos: string }>>('SELECT cost_nanos FROM usage_ledger WHERE request_id = $1', [requestId]);
        expect(ledger.length).toBeGreaterThan(0);
        const audit = await db.dataSource.query<Array<{ action: string }>>('SELECT action FROM audit_events WHERE request_id = $1', [requestId]);
        expect(audit).toEqual([{ action: 'completion' }]);
      } finally {
        await db.close();
      }
    } finally {
      await pgdb.drop();
    }
  });

  it('ends a stream that outlives SHUTDOWN_DRAIN_MS with an SSE error event, then [DONE]', async () => {
    gw = await startTestGateway({ env: { SHUTDOWN_DRAIN_MS: '200' } });
    const carol = await gw.tenants.create();
    gw.stub.configure({ chunkDelayMs: 10_000, completionTokens: 5 });
    const stream = await openStream(gw, carol, 'never finishes in time');
    await pollUntil(() => expect(stream.frames.length).toBeGreaterThan(0));

    await gw.gateway.close();
    await stream.done;
    const last = stream.frames.at(-1);
    const error = JSON.parse(stream.frames.at(-2)?.slice('data: '.length) ?? '{}') as { error?: { code: string; type: string; message: string } };
    expect(last).toBe('data: [DONE]');
    expect(error.error).toMatchObject({ code: 'unavailable', type: 'overloaded_error' });
    expect(error.error?.message).toMatch(/shutting down/);
  });

  it('closes connections that have not sent a whole request, instead of waiting for them', async () => {
    gw = await startTestGateway({ env: { SHUTDOWN_DRAIN_MS: '200' } });
    const origin = new URL(gw.url);
    const open = (bytes: string) =>
      new Promise<{ closed: Promise<void> }>((resolve, reject) => {
        const socket = connect(Number(origin.port), origin.hostname, () => {
          socket.write(bytes);
          resolve({ closed: new Promise<void>((done) => socket.once('close', () => done())) });
        });
        socket.once('error', reject);
        socket.on('error', () => undefined);
      });
    // A load balancer's pre-opened connection, and a client midway through its headers.
    const silent = await open('');
    const partial = await open('POST /v1/chat/completions HTTP/1.1\r\nhost: gatehouse\r\n');
    // Node would hold both for its headersTimeout (60 s); the documented bound is the drain plus 8 s.
    const guard = new Promise<string>((resolve) => setTimeout(() => resolve('still closing after 10 s'), 10_000).unref());
    expect(await Promise.race([gw.gateway.close().then(() => 'closed'), guard])).toBe('closed');
    await silent.closed;
    await partial.closed;
  });

  it('answers a request accepted after the drain went idle, while later shutdown hooks still run, before closing its connection', async () => {
    gw = await startTestGateway({ env: { SHUTDOWN_DRAIN_MS: '30000' } });
    const t = await gw.tenants.create();
    // A running job holds the shutdown in the job workers' hook, after the drain (idle at once) ended.
    gw.stub.configure({ latencyMs: 2500 });
    const job = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'a job' }] }, { prefer: 'respond-async' });
    expect(job.status).toBe(202);
    const stub = gw.stub;
    await pollUntil(() => expect(stub.hits).toBe(1));
    const closing = gw.gateway.close();
    const probe = new ApiClient(gw.url, undefined);
    await pollUntil(async () => expect((await probe.get('/health/ready')).status).toBe(503));
    // Readiness is down; a load balancer that has not noticed yet still sends this one, which
    // (as slow as the job) is still running when the job ends and Nest closes the server.
    const late = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'late but accepted' }] }).then(
      (r) => `status ${r.status}`,
      (e: Error) => `cut: ${String((e.cause as Error | undefined)?.message ?? e.message)}`,
    );
    await closing;
    expect(late).toBe('status 200');
  });

  it('answers a request arriving while the server closes in the OpenAI envelope (503 unavailable), with its request id, audit row and log line; liveness still 200', async () => {
    const pgdb = await createPostgresDatabase();
    const written: string[] = [];
    try {
      const logger = createLogger('info', { write: (line: string) => void written.push(line) });
      gw = await startTestGateway({ db: 'postgres', postgresUrl: pgdb.url, logger, env: { LOG_LEVEL: 'info', SHUTDOWN_DRAIN_MS: '30000' } });
      const t = await gw.tenants.create();
      // The upstream answers the job and the late call only when the test says so.
      const held = new Map<string, () => void>();
      gw.stub.script = (_req, body, res: ServerResponse) => {
        const content = (body.messages as Array<{ content: string }>)[0]?.content ?? '';
        held.set(content, () => answerHeld(res, body.model));
        return true;
      };
      // The running job holds the shutdown in the job workers' hook, after the drain went idle.
      const { closing, probe } = await closeWhileAJobRuns(gw, t, held);
      const late = t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'late' }] });
      await pollUntil(() => expect(held.has('late')).toBe(true));
      // The job ends, Nest closes the server, and its preClose hook waits for the late call with
      // the listener still open: what arrives now is refused.
      held.get('a job')?.();
      const refused = await pollUntil(async () => {
        const r = await t.api.get<{ error?: { code: string; type: string } }>('/v1/models');
        expect(r.status).toBe(503);
        return r;
      });
      expect(refused.body, JSON.stringify(refused.body)).toMatchObject({ error: { type: 'overloaded_error', code: 'unavailable' } });
      expect(refused.headers.get('connection')).toBe('close');
      const requestId = refused.headers.get('x-request-id');
      expect(requestId).toBeTruthy();
      expect((await probe.get('/health/live')).status).toBe(200);
      held.get('late')?.();
      expect((await late).status).toBe(200);
      await closing;

      const own = written
        .join('')
        .split('\n')
        .filter((l) => l.length > 0)
        .map((l) => JSON.parse(l) as { msg?: string; reqId?: string; status?: number })
        .filter((l) => l.reqId === requestId && l.msg === 'request');
      expect(own.map((l) => l.status)).toEqual([503]);
      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        const audit = await db.dataSource.query<Array<{ action: string; status: number }>>('SELECT action, status FROM audit_events WHERE request_id = $1', [
          requestId,
        ]);
        expect(audit).toEqual([{ action: 'GET /v1/models', status: 503 }]);
      } finally {
        await db.close();
      }
    } finally {
      await pgdb.drop();
    }
  });

  it('settles a call accepted after the drain and cut as the server closes before the last flush: its audit row is stored, its reservation given back', async () => {
    const pgdb = await createPostgresDatabase();
    try {
      gw = await startTestGateway({ db: 'postgres', postgresUrl: pgdb.url, env: { SHUTDOWN_DRAIN_MS: '300' } });
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      // The upstream answers the job when the test says so, and the late call never.
      const held = new Map<string, () => void>();
      gw.stub.script = (_req, body, res: ServerResponse) => {
        const content = (body.messages as Array<{ content: string }>)[0]?.content ?? '';
        held.set(content, () => answerHeld(res, body.model));
        return true;
      };
      const { closing } = await closeWhileAJobRuns(gw, t, held);
      const requestId = `late-cut-${t.userId}`;
      const late = fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', 'x-request-id': requestId },
        body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'late and never answered' }] }),
      }).then(
        (r) => r.status,
        () => 'connection closed',
      );
      await pollUntil(() => expect(held.has('late and never answered')).toBe(true));
      // The job ends; the server closes with the late call still running, past the drain's
      // deadline: its connection is closed.
      held.get('a job')?.();
      await closing;
      expect(await late).toBe('connection closed');

      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        const audit = await db.dataSource.query<Array<{ action: string }>>('SELECT action FROM audit_events WHERE request_id = $1', [requestId]);
        expect(audit).toEqual([{ action: 'completion' }]);
        const reserved = await db.dataSource.query<Array<{ n: string }>>('SELECT count(*) AS n FROM budget_reservations WHERE user_id = $1', [t.userId]);
        expect(reserved).toEqual([{ n: '0' }]);
      } finally {
        await db.close();
      }
    } finally {
      await pgdb.drop();
    }
  });

  it('ends a stream accepted after the drain and still open as the server closes with the shutting-down error event and [DONE], and settles it', async () => {
    const pgdb = await createPostgresDatabase();
    try {
      gw = await startTestGateway({ db: 'postgres', postgresUrl: pgdb.url, env: { SHUTDOWN_DRAIN_MS: '300' } });
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const held = new Map<string, () => void>();
      gw.stub.script = (_req, body, res: ServerResponse) => {
        const content = (body.messages as Array<{ content: string }>)[0]?.content ?? '';
        if (body.stream === true) {
          // One content chunk, then nothing more: the upstream is still generating.
          res.writeHead(200, { 'content-type': 'text/event-stream' });
          const chunk = { id: 'c1', object: 'chat.completion.chunk', created: 1, model: body.model, choices: [{ index: 0, delta: { role: 'assistant', content: 'partial ' }, finish_reason: null }] };
          res.write(`data: ${JSON.stringify(chunk)}\n\n`);
          held.set(content, () => undefined);
          return true;
        }
        held.set(content, () => answerHeld(res, body.model));
        return true;
      };
      const { closing } = await closeWhileAJobRuns(gw, t, held);
      const requestId = `late-stream-${t.userId}`;
      const res = await fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${t.key}`, 'content-type': 'application/json', 'x-request-id': requestId },
        body: JSON.stringify({ model: 'auto', stream: true, messages: [{ role: 'user', content: 'late stream' }] }),
      });
      expect(res.status).toBe(200);
      const text = (async () => {
        let out = '';
        const reader = (res.body as ReadableStream<Uint8Array>).getReader();
        const decoder = new TextDecoder();
        try {
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            out += decoder.decode(value, { stream: true });
          }
        } catch (e) {
          out += `\n<<connection error: ${(e as Error).message}>>`;
        }
        return out;
      })();
      await pollUntil(() => expect(held.has('late stream')).toBe(true));
      held.get('a job')?.();
      await closing;
      const body = await text;
      const db = await openDatabase({ driver: 'postgres', url: pgdb.url }, DATABASE_CONTENT);
      try {
        const audit = await db.dataSource.query<Array<{ action: string }>>('SELECT action FROM audit_events WHERE request_id = $1', [requestId]);
        const reserved = await db.dataSource.query<Array<{ n: string }>>('SELECT count(*) AS n FROM budget_reservations WHERE user_id = $1', [t.userId]);
        expect(audit).toEqual([{ action: 'completion' }]);
        expect(reserved).toEqual([{ n: '0' }]);
      } finally {
        await db.close();
      }
      expect(body).toContain('"code":"unavailable"');
      expect(body.trimEnd().endsWith('data: [DONE]')).toBe(true);
    } finally {
      await pgdb.drop();
    }
  });
});

/**
 * Submits a job whose upstream answer `held` keeps back, then starts closing the gateway and waits
 * for readiness to go down: the running job holds the shutdown in the job workers' hook after the
 * drain went idle, until the test releases `held.get('a job')`, with the listener still open.
 */
async function closeWhileAJobRuns(gw: TestGateway, t: Tenant, held: Map<string, () => void>): Promise<{ closing: Promise<void>; probe: ApiClient }> {
  const job = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'a job' }] }, { prefer: 'respond-async' });
  expect(job.status).toBe(202);
  await pollUntil(() => expect(held.has('a job')).toBe(true));
  const closing = gw.gateway.close();
  const probe = new ApiClient(gw.url, undefined);
  await pollUntil(async () => expect((await probe.get('/health/ready')).status).toBe(503));
  return { closing, probe };
}
