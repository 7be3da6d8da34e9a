import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { postSse, startTestGateway, type TestGateway } from '../support/gateway.js';

const MINI = 'openai/gpt-4o-mini';
/** A TLS record's worth: how an HTTPS upstream's bytes arrive. */
const PIECE = 16 * 1024;

/**
 * One SSE event far larger than a read: a ~4 MB base64 image, as OpenRouter streams image outputs
 * (`delta.images`). It must reach the client whole and unchanged; the parser's cost for it (once
 * quadratic in the pieces, seconds of blocked event loop) is checked by sse.spec.ts and the bench.
 */
describe.each(['undici', 'sdk'] as const)('a 4 MB stream event arriving in 16 KiB pieces (%s driver)', (driver) => {
  let gw: TestGateway;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_DRIVER: driver } });
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => gw.stub.reset());

  it('is relayed intact, followed by the rest of the stream', async () => {
    const t = await gw.tenants.create();
    const image = JSON.stringify({
      id: 'c',
      object: 'chat.completion.chunk',
      created: 1,
      model: MINI,
      choices: [{ index: 0, delta: { role: 'assistant', content: '', images: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${'iVBORw0K'.repeat(512 * 1024)}` } }] }, finish_reason: null }],
    });
    const finish = JSON.stringify({ id: 'c', object: 'chat.completion.chunk', created: 1, model: MINI, choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] });
    const bytes = Buffer.from(`data: ${image}\r\n\r\n`);
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      void (async () => {
        for (let i = 0; i < bytes.length; i += PIECE) {
          res.write(bytes.subarray(i, i + PIECE));
          await new Promise((resolve) => setImmediate(resolve));
        }
        res.end(`data: ${finish}\n\ndata: [DONE]\n\n`);
      })();
      return true;
    };
    const res = await postSse(gw, t.key, { model: MINI, stream: true, messages: [{ role: 'user', content: `draw #${Date.now()}` }] });
    expect(res.status).toBe(200);
    expect(res.events).toHaveLength(3);
    expect(res.events[0] === image).toBe(true);
    expect(res.events[1]).toBe(finish);
    expect(res.events[2]).toBe('[DONE]');
  });
});
