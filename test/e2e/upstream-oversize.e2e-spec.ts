import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { MAX_UPSTREAM_BODY_BYTES } from '../../src/upstream/llm-client.js';
import { postSse, startTestGateway, type TestGateway } from '../support/gateway.js';

// A misbehaving upstream (a loop, a proxy streaming an error page) must not grow the gateway's
// memory without bound: an answer, or one stream event, over MAX_UPSTREAM_BODY_BYTES is a bad
// response, never relayed. The default (undici) driver; the stub's script sends what no fault
// switch describes.

const MINI = 'openai/gpt-4o-mini';
const unique = (text: string) => `${text} ${randomBytes(4).toString('hex')}`;
/** Content that makes a valid answer just over the limit. */
const HUGE = 'x'.repeat(MAX_UPSTREAM_BODY_BYTES + 1024);

function chunk(model: string, delta: Record<string, unknown>, finish: string | null): string {
  return `data: ${JSON.stringify({ id: 'chatcmpl-s', object: 'chat.completion.chunk', created: 0, model, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
}

describe('an upstream answer over the size limit (undici driver)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_DRIVER: 'undici', UPSTREAM_RETRY_ATTEMPTS: '1' } });
  });
  beforeEach(() => gw.stub.reset());
  afterAll(async () => {
    await gw?.close();
  });

  it('a JSON answer over the limit is 502 upstream_bad_response, not relayed', async () => {
    gw.stub.script = (_req, body, res) => {
      const completion = {
        id: 'chatcmpl-j',
        object: 'chat.completion',
        created: 0,
        model: String(body.model),
        choices: [{ index: 0, message: { role: 'assistant', content: HUGE }, finish_reason: 'stop' }],
      };
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(completion));
      return true;
    };
    const t = await gw.tenants.create();
    const res = await t.api.post<{ error: { code: string } }>('/v1/chat/completions', { model: MINI, messages: [{ role: 'user', content: unique('huge json') }] });
    expect({ status: res.status, code: res.body.error?.code }).toEqual({ status: 502, code: 'upstream_bad_response' });
  });

  it('a stream event over the limit ends the stream with an error event after what came before', async () => {
    gw.stub.script = (_req, body, res) => {
      const model = String(body.model);
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(chunk(model, { role: 'assistant', content: 'first ' }, null));
      res.end(chunk(model, { content: HUGE }, null) + chunk(model, {}, 'stop') + 'data: [DONE]\n\n');
      return true;
    };
    const t = await gw.tenants.create();
    const { status, events, text } = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: unique('huge event') }] });
    expect(status).toBe(200);
    expect(text.length).toBeLessThan(64 * 1024);
    expect((JSON.parse(events[0] ?? '{}') as { choices: Array<{ delta: { content?: string } }> }).choices[0]?.delta.content).toBe('first ');
    const errors = events.filter((e) => e !== '[DONE]' && (JSON.parse(e) as { error?: unknown }).error != null);
    expect(errors).toHaveLength(1);
    expect(events.at(-1)).toBe('[DONE]');
  });
});
