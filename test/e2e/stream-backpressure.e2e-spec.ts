import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';
import { openStream } from '../support/raw-http.js';

/**
 * The answer: as many words as the default route's cap allows, each padded, ~33 MB in all. On
 * loopback the stub's and the gateway's send buffers take ~4 MB each, the receive buffers ~1-2 MB,
 * and the gateway's upstream relay queues up to 256 events (8 MB here) before it pauses its socket:
 * the stream must be well beyond that for a stuck stub to show.
 */
const WORDS = 1000;
const WORD_BYTES = 32 * 1024;
/** Long enough for an unpaced gateway to have read the whole answer from the stub (it takes well under a second). */
const STALL_MS = 1500;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A client that reads slower than the upstream writes (or stops reading) must hold the answer
 * back in the upstream, not in the gateway: the gateway stops pulling while the client's socket
 * is backed up, and resumes when it drains. Real sockets end to end: stub → gateway → client.
 */
describe('streaming back-pressure (stub upstream, PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  const lines: Array<Record<string, unknown>> = [];

  beforeAll(async () => {
    const logger = createLogger('info', { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) });
    gw = await startTestGateway({ logger, env: { LOG_LEVEL: 'info' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
    gw.stub.configure({ completionTokens: WORDS, wordBytes: WORD_BYTES });
  });

  it('a client that stops reading holds the upstream back; when it reads again it gets every event through [DONE]', async () => {
    const { res } = await openStream(gw.url, alice.key, `slow reader ${Date.now()}`);
    expect(res.statusCode).toBe(200);
    expect(gw.stub.hits).toBe(1);

    // The client reads nothing for a while: the stub must still be stuck writing its answer.
    await sleep(STALL_MS);
    expect(gw.stub.streamsFinished).toBe(0);

    res.setEncoding('utf8');
    let body = '';
    for await (const chunk of res) body += chunk as string;
    const frames = body.split('\n\n').filter((frame) => frame !== '');
    expect(frames.at(-1)).toBe('data: [DONE]');
    const chunks = frames.slice(0, -1).map((frame) => JSON.parse(frame.slice('data: '.length)) as { choices: Array<{ delta: { content?: string } }> });
    // The role chunk, one per word, the finish chunk.
    expect(chunks).toHaveLength(WORDS + 2);
    const text = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
    const words = text.split(' ');
    expect(words).toHaveLength(WORDS);
    expect(words.every((word) => word.length === WORD_BYTES)).toBe(true);
    await pollUntil(() => expect(gw.stub.streamsFinished).toBe(1));
    const done = await pollUntil(() => {
      const line = lines.find((l) => l.msg === 'completion' && l.reqId === res.headers['x-request-id']);
      expect(line).toBeDefined();
      return line;
    });
    expect(done).toMatchObject({ outcome: 'ok', completionTokens: WORDS });
  });

  it('a client that leaves while the gateway waits for it to drain ends the request at once, and the upstream stream with it', async () => {
    const { req, res } = await openStream(gw.url, alice.key, `leaving reader ${Date.now()}`);
    expect(res.statusCode).toBe(200);
    await sleep(STALL_MS);
    expect(gw.stub.streamsFinished).toBe(0);

    req.destroy();
    const done = await pollUntil(() => {
      const line = lines.find((l) => l.msg === 'completion' && l.reqId === res.headers['x-request-id']);
      expect(line).toBeDefined();
      return line;
    });
    expect(done).toMatchObject({ outcome: 'client_closed' });
    // The gateway hung up on the upstream: its answer never finished.
    await sleep(200);
    expect(gw.stub.streamsFinished).toBe(0);
  });
});
