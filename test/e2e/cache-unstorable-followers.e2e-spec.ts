import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REDIS_URL } from '../support/databases.js';
import { postSse, startTestGateway, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, uniqueRedisPrefix } from '../support/redis.js';

/**
 * A stream that completes normally but cannot be stored: a replay cannot render every delta field
 * (OpenRouter's `reasoning_details`, which reasoning models stream; also `annotations`, `images`).
 * Its identical followers must then go on together, as plain misses. They used to be handed the
 * lead one after the other, as after a failure, each waiting out the answer before it (which could
 * not be stored either): N identical streams ran one at a time, on one instance and across
 * instances sharing Redis, and the upstream was still called N times.
 */
describe.each([
  ['one instance, memory cache', false],
  ['two instances sharing Redis', true],
] as const)('identical streams whose answer cannot be stored (%s)', (_name, shared) => {
  const env = shared ? { REDIS_URL, REDIS_KEY_PREFIX: uniqueRedisPrefix('cache-unstorable') } : {};
  let a: TestGateway;
  let b: TestGateway;

  beforeAll(async () => {
    a = await startTestGateway(shared ? { db: 'postgres', env } : {});
    b = shared ? await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey, env }) : a;
  });
  afterAll(async () => {
    if (b !== a) await b?.close();
    await a?.close();
    if (shared) await dropRedisKeys(env.REDIS_KEY_PREFIX as string);
  });

  it('run together once the first has answered, not one after the other', async () => {
    const alice = await a.tenants.create();
    let inFlight = 0;
    let mostAtOnce = 0;
    a.stub.script = (_req, body, res) => {
      if (body.stream !== true) return false;
      inFlight += 1;
      mostAtOnce = Math.max(mostAtOnce, inFlight);
      const head = { id: `chatcmpl-reasoning-${inFlight}`, object: 'chat.completion.chunk', created: 1_700_000_000, model: body.model };
      const send = (o: Record<string, unknown>) => res.write(`data: ${JSON.stringify({ ...head, ...o })}\n\n`);
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      send({ choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }] });
      // Long enough for every identical request to arrive and wait on this one.
      setTimeout(() => {
        send({ choices: [{ index: 0, delta: { reasoning: 'Thinking.', reasoning_details: [{ type: 'reasoning.text', text: 'Thinking.', index: 0 }] }, finish_reason: null }] });
        send({ choices: [{ index: 0, delta: { content: 'Answer.' }, finish_reason: null }] });
        send({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] });
        send({ choices: [], usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 } });
        inFlight -= 1;
        res.end('data: [DONE]\n\n');
      }, 800);
      return true;
    };
    try {
      const content = `reasoning-stream ${randomBytes(4).toString('hex')}`;
      const results = await Promise.all(
        [a, a, b, b, a].map((gw) => postSse(gw, alice.key, { model: 'auto', stream: true, messages: [{ role: 'user', content }] })),
      );
      expect(results.map((r) => r.status)).toEqual(Array(5).fill(200));
      for (const r of results) expect(r.text).toContain('Answer.');
      // The first alone, then the other four at once (one at a time before: never more than 1).
      expect(mostAtOnce).toBe(4);
    } finally {
      a.stub.script = undefined;
    }
  });
});
