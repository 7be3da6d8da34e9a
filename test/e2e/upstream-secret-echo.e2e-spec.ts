import type { IncomingMessage, ServerResponse } from 'node:http';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { pollUntil, postSse, startTestGateway, type TestGateway } from '../support/gateway.js';

// An upstream (or a proxy in front of it) that echoes the request's Authorization header in its
// error text: the gateway's own upstream key must never reach the caller (sync, stream, job), the
// job record, the audit trail or the log (API.md: never logged, never returned). The key here is
// not shaped like one (no `sk-`), and is echoed bare as well as after `Bearer`: only the exact
// configured key, not a pattern, catches that. One key per driver, so each driver is shown to
// withhold its own.
const upstreamKey = (driver: string) => `or-plain-${driver}-Zk41mQv8rT2xW7pLc`;
const MINI = 'openai/gpt-4o-mini';

interface ErrorBody {
  error: { message: string; type: string; code: string | null };
}

/** What the upstream says, echoing the key it was sent. */
function echoed(req: IncomingMessage): string {
  const authorization = req.headers.authorization ?? '';
  return `invalid request (authorization: ${authorization}; key: ${authorization.replace(/^Bearer /, '')})`;
}

function json(res: ServerResponse, status: number, body: unknown): true {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
  return true;
}

function chunk(model: string, content: string): string {
  return `data: ${JSON.stringify({ id: 'chatcmpl-e', object: 'chat.completion.chunk', created: 0, model, choices: [{ index: 0, delta: { content }, finish_reason: null }] })}\n\n`;
}

describe.each(['undici', 'sdk'] as const)('an upstream that echoes the gateway key in its errors (%s driver)', (driver) => {
  const UPSTREAM_KEY = upstreamKey(driver);
  let gw: TestGateway;
  const written: string[] = [];

  beforeAll(async () => {
    const logger = createLogger('debug', { write: (line: string) => void written.push(line) });
    gw = await startTestGateway({
      logger,
      env: {
        LOG_LEVEL: 'debug',
        OPENROUTER_API_KEY: UPSTREAM_KEY,
        UPSTREAM_DRIVER: driver,
        AUDIT_FLUSH_MS: '20',
        UPSTREAM_RETRY_ATTEMPTS: '1',
        UPSTREAM_RETRY_BASE_MS: '1',
        UPSTREAM_RETRY_MAX_DELAY_MS: '5',
      },
    });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  it('a sync 400: the upstream message is relayed, the key masked', async () => {
    gw.stub.script = (req, _body, res) => json(res, 400, { error: { message: echoed(req), code: 'invalid_request', type: 'invalid_request_error' } });
    const t = await gw.tenants.create();
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: 'echo 400' }] });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toContain('invalid request');
    expect(res.body.error.message).toContain('[redacted]');
    expect(JSON.stringify(res.body)).not.toContain(UPSTREAM_KEY);
  });

  it("a 403 for flagged input (the caller's 400): the upstream message is relayed, the key masked", async () => {
    gw.stub.script = (req, _body, res) =>
      json(res, 403, { error: { code: 403, message: echoed(req), metadata: { reasons: ['violence'], flagged_input: 'x' } } });
    const t = await gw.tenants.create();
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: 'echo flagged' }] });
    expect(res.status).toBe(400);
    expect(res.body.error.code).toBe('content_flagged');
    expect(JSON.stringify(res.body)).not.toContain(UPSTREAM_KEY);
  });

  it('an error object inside a 200 answer: the key masked', async () => {
    gw.stub.script = (req, _body, res) => json(res, 200, { error: { code: 400, message: echoed(req) } });
    const t = await gw.tenants.create();
    const res = await t.api.post<ErrorBody>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: 'echo in band' }] });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toContain('invalid request');
    expect(JSON.stringify(res.body)).not.toContain(UPSTREAM_KEY);
  });

  it('a stream refused with 400: the upstream message is relayed, the key masked', async () => {
    gw.stub.script = (req, _body, res) => json(res, 400, { error: { message: echoed(req), code: 'invalid_request' } });
    const t = await gw.tenants.create();
    const res = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: 'echo stream' }] });
    expect(res.status).toBe(400);
    expect(res.text).toContain('invalid request');
    expect(res.text).not.toContain(UPSTREAM_KEY);
  });

  it('a stream whose error event comes midway: the key masked in the error event', async () => {
    gw.stub.script = (req, body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.end(`${chunk(String(body.model), 'partial ')}data: ${JSON.stringify({ error: { code: 502, message: echoed(req) } })}\n\n`);
      return true;
    };
    const t = await gw.tenants.create();
    const res = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: 'echo mid stream' }] });
    expect(res.status).toBe(200);
    expect(res.text).toContain('partial');
    expect(res.text).not.toContain(UPSTREAM_KEY);
  });

  it('an async job refused with 400: neither its record nor GET /v1/jobs/{id} holds the key', async () => {
    gw.stub.script = (req, _body, res) => json(res, 400, { error: { message: echoed(req), code: 'invalid_request' } });
    const t = await gw.tenants.create();
    const submitted = await t.api.post<{ id: string }>(
      '/v1/chat/completions',
      { model: MINI, messages: [{ role: 'user', content: 'echo job' }] },
      { prefer: 'respond-async' },
    );
    expect(submitted.status).toBe(202);
    const job = await pollUntil(async () => {
      const res = await t.api.get<{ status: string; error: { message: string } | null }>(`/v1/jobs/${submitted.body.id}`);
      expect(res.body.status).toBe('failed');
      return res;
    }, 20_000);
    expect(job.body.error?.message).toContain('invalid request');
    expect(JSON.stringify(job.body)).not.toContain(UPSTREAM_KEY);
    const rows = await gw.gateway.app.get(DataSource).query<Array<{ text: string }>>('SELECT j::text AS text FROM jobs j');
    expect(rows.map((r) => r.text).join('\n')).not.toContain(UPSTREAM_KEY);
  });

  it('after all of the above, no audit row and no log line holds the key', async () => {
    await pollUntil(async () =>
      expect((await gw.admin.get<{ details: { audit: { buffered: number } } }>('/health/ready')).body.details.audit.buffered).toBe(0),
    );
    const rows = await gw.gateway.app.get(DataSource).query<Array<{ text: string }>>('SELECT a::text AS text FROM audit_events a');
    expect(rows.length).toBeGreaterThan(0);
    expect(rows.map((r) => r.text).join('\n')).not.toContain(UPSTREAM_KEY);
    expect(written.join('')).not.toContain(UPSTREAM_KEY);
  });
});
