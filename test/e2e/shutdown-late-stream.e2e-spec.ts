import type { ServerResponse } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import { openDatabase } from '../../src/database/data-source.js';
import { createPostgresDatabase } from '../support/databases.js';
import { ApiClient, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

// A stream accepted after the drain went idle (a job holds the shutdown), still running when the
// server closes past SIGTERM + SHUTDOWN_DRAIN_MS + 2 s: quiesce() closes its connection. A stream
// cut at the drain deadline gets the SSE error event (503 unavailable) and [DONE] (API.md
// "Decisions", docs/operations.md "How a stream is cut at the deadline"), and so does this one.
describe('late stream cut as the server closes', () => {
  let gw: TestGateway | undefined;
  afterEach(async () => {
    if (!gw) return;
    await gw.stub.close();
    await gw.database.drop();
    gw = undefined;
  });

  it('ends with the shutting-down error event and [DONE], and is settled', async () => {
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
        held.set(content, () => {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end(
            JSON.stringify({
              id: 'chatcmpl-held',
              object: 'chat.completion',
              created: 1,
              model: body.model,
              choices: [{ index: 0, message: { role: 'assistant', content: 'fine' }, finish_reason: 'stop' }],
              usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 },
            }),
          );
        });
        return true;
      };
      const job = await t.api.post('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: 'a job' }] }, { prefer: 'respond-async' });
      expect(job.status).toBe(202);
      await pollUntil(() => expect(held.has('a job')).toBe(true));
      const closing = gw.gateway.close();
      const probe = new ApiClient(gw.url, undefined);
      await pollUntil(async () => expect((await probe.get('/health/ready')).status).toBe(503));
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
