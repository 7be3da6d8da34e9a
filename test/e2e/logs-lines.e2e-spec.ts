import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { ApiClient, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

interface Line {
  msg?: string;
  reqId?: string;
  status?: number;
  context?: string;
  url?: string;
}

describe('one log line per request, with a context (docs/operations.md "Logs")', () => {
  let gw: TestGateway;
  const written: string[] = [];
  const lines = (): Line[] =>
    written
      .join('')
      .split('\n')
      .filter((l) => l.length > 0)
      .map((l) => JSON.parse(l) as Line);

  beforeAll(async () => {
    const logger = createLogger('info', { write: (line: string) => void written.push(line) });
    gw = await startTestGateway({ logger, env: { LOG_LEVEL: 'info', RATE_LIMIT_KEY_RPM: '2' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  const scrapeCount = async (status: string): Promise<number> => {
    const text = (await new ApiClient(gw.url, undefined).get<string>('/metrics')).body;
    let n = 0;
    for (const line of text.split('\n')) {
      if (line.startsWith('gatehouse_http_request_duration_seconds_count{') && line.includes(`status="${status}"`)) n += Number(line.split(' ').at(-1));
    }
    return n;
  };

  it('logs (and counts in the HTTP histogram) a 400 answered for a URL Fastify cannot decode', async () => {
    const before = await scrapeCount('400');
    const res = await fetch(`${gw.url}/v1/chat/completions%E0%A4%A`, { method: 'POST', headers: { 'x-request-id': 'bad-url-1' } });
    expect(res.status).toBe(400);
    expect(res.headers.get('x-request-id')).toBe('bad-url-1');
    await new Promise((r) => setTimeout(r, 400));
    const own = lines().filter((l) => l.reqId === 'bad-url-1' && l.msg === 'request');
    const after = await scrapeCount('400');
    expect({ lines: own.length, histogram: after - before }).toEqual({ lines: 1, histogram: 1 });
  });

  it('gives every line a `context`, as "Every line has level, time, service, context and msg" says', async () => {
    const alice = await gw.tenants.create();
    const res = await alice.api.get('/v1/models', { 'x-request-id': 'ctx-1' });
    expect(res.status).toBe(200);
    await new Promise((r) => setTimeout(r, 400));
    const own = lines().filter((l) => l.reqId === 'ctx-1');
    expect(own.map((l) => [l.msg, l.context])).toEqual([['request', expect.any(String)]]);
  });

  // A client whose base URL has the key in it (`https://gw/v1/gh-…`), or that passes it where an id
  // goes: the path is in the access line, and the key must not be.
  it('masks a caller key in the URL path of the access line, and keeps every other path as it came', async () => {
    // Two tenants: this file's rate limit lets a key make two calls a minute.
    const alice = await gw.tenants.create();
    const bob = await gw.tenants.create();
    const anon = new ApiClient(gw.url, undefined);
    const asked = [
      ['key-path-unmatched', await anon.get(`/v1/${alice.key}/models`, { 'x-request-id': 'key-path-unmatched' })],
      ['key-path-param', await alice.api.get(`/v1/jobs/${alice.key}`, { 'x-request-id': 'key-path-param' })],
      ['plain-param', await bob.api.get('/v1/jobs/job-not-there', { 'x-request-id': 'plain-param' })],
      ['plain-route', await bob.api.get('/v1/models?limit=1', { 'x-request-id': 'plain-route' })],
    ] as const;
    expect(asked.map(([, r]) => r.status)).toEqual([404, 404, 404, 200]);
    await pollUntil(() => {
      const urls = asked.map(([id]) => lines().find((l) => l.reqId === id && l.msg === 'request')?.url);
      expect(urls).toEqual(['/v1/[redacted]/models', '/v1/jobs/[redacted]', '/v1/jobs/job-not-there', '/v1/models']);
    });
    expect(written.join(''), 'the key appears in the log').not.toContain(alice.key);
  });
});
