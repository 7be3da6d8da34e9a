import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../libs/stub-upstream/src/index.js';
import { startFloorProxy } from './floor-proxy.js';
import { startParseFloorProxy } from './parse-floor-proxy.js';
import { bodyFactory, checkResponse, runLoad } from './load.js';
import { type BenchCase, BenchFailure, type BenchTarget, measureCase, type StubCounter, type Timing } from './measure.js';

// Count-bounded runs: no durations, no timing assertions.
const TIMING: Timing = { warmupMs: 0, durationMs: 0, timeoutMs: 5000, warmupRequests: 4, requests: 20 };
const MODEL = 'openai/gpt-4o-mini';

let stub: StubUpstream;
const counter: StubCounter = { hits: () => Promise.resolve(stub.hits) };
const servers: Server[] = [];

beforeAll(async () => {
  stub = await startStubUpstream({ recordRequests: false });
});
afterAll(async () => {
  await stub.close();
});
afterEach(async () => {
  stub.reset();
  await Promise.all(
    servers.splice(0).map(
      (s) =>
        new Promise((r) => {
          s.closeAllConnections();
          s.close(r);
        }),
    ),
  );
});

function direct(): BenchTarget {
  return { name: 'direct', endpoint: `${stub.url}/chat/completions`, headers: {}, model: MODEL, pid: undefined };
}

async function listen(handler: Parameters<typeof createServer>[1]): Promise<string> {
  const server = createServer(handler);
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** A "gateway" that answers from a canned body, optionally still calling the stub first. */
async function fakeGateway(opts: { callStub: boolean; cacheHeader?: string }): Promise<BenchTarget> {
  const stubUrl = new URL(stub.url);
  const origin = await listen((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      const answer = (): void => {
        res.writeHead(200, { 'content-type': 'application/json', ...(opts.cacheHeader ? { 'x-gateway-cache': opts.cacheHeader } : {}) });
        res.end('{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}');
      };
      if (!opts.callStub) return answer();
      const upstream = request(
        { host: stubUrl.hostname, port: stubUrl.port, method: 'POST', path: '/v1/chat/completions', headers: { 'content-type': 'application/json' } },
        (r) => {
          r.resume();
          r.on('end', answer);
        },
      );
      upstream.end(JSON.stringify({ ...(JSON.parse(body) as object), model: MODEL }));
    });
  });
  return { name: 'fake', endpoint: `${origin}/v1/chat/completions`, headers: {}, model: undefined, pid: undefined };
}

const measure = (target: BenchTarget, benchCase: BenchCase) =>
  measureCase({ round: 1, target, benchCase, timing: TIMING, stub: counter, load: runLoad, tag: `t${Math.random().toString(36).slice(2)}` });

describe('measureCase against the real stub', () => {
  it.each(['json', 'sse'] as const)('passes a clean %s run and records every measured request', async (kind) => {
    const run = await measure(direct(), { kind, connections: 4, cache: 'miss' });
    expect(run.record.errors).toBe(0);
    expect(run.record.completed).toBe(24);
    expect(run.record.stubHits).toBe(24);
    expect(run.record.requests).toBeGreaterThanOrEqual(20);
    expect(run.latencyMs.length).toBe(run.record.requests);
    expect(run.ttfbMs.length).toBe(kind === 'sse' ? run.record.requests : 0);
  });

  it('passes through the floor proxy, every request reaching the stub once', async () => {
    const floor = await startFloorProxy(new URL(stub.url).origin);
    try {
      const run = await measure(
        { name: 'floor', endpoint: `${floor.url}/v1/chat/completions`, headers: {}, model: MODEL, pid: process.pid },
        { kind: 'sse', connections: 2, cache: 'miss' },
      );
      expect(run.record.stubHits).toBe(24);
      expect(run.record.cpuSeconds).toBeGreaterThanOrEqual(0);
      expect(run.record.cpuSystemSeconds).toBeGreaterThanOrEqual(0);
      expect(run.record.cpuSystemSeconds).toBeLessThanOrEqual(run.record.cpuSeconds ?? 0);
      expect(run.record.rssMaxMb).toBeGreaterThan(0);
    } finally {
      await floor.close();
    }
  });

  it.each(['json', 'sse'] as const)('passes %s through the parse floor proxy, every request reaching the stub once', async (kind) => {
    const parseFloor = await startParseFloorProxy(new URL(stub.url).origin);
    try {
      const run = await measure(
        { name: 'parse floor', endpoint: `${parseFloor.url}/v1/chat/completions`, headers: {}, model: MODEL, pid: process.pid },
        { kind, connections: 2, cache: 'miss' },
      );
      expect(run.record.stubHits).toBe(24);
      expect(parseFloor.totalTokens).toBeGreaterThan(0);
    } finally {
      await parseFloor.close();
    }
  });
});

describe('measureCase fails loudly', () => {
  it('when a request errors (upstream 500)', async () => {
    stub.configure({ status: 500 });
    const run = measure(direct(), { kind: 'json', connections: 2, cache: 'miss' });
    await expect(run).rejects.toBeInstanceOf(BenchFailure);
    await expect(run).rejects.toThrow(/24 of 24 requests failed[\s\S]*HTTP 500/);
  });

  it('when a stream is cut before [DONE]', async () => {
    stub.configure({ cutAfterChunks: 2 });
    await expect(measure(direct(), { kind: 'sse', connections: 1, cache: 'miss' })).rejects.toThrow(/requests failed/);
  });

  it('when answers never reached the stub', async () => {
    const target = await fakeGateway({ callStub: false });
    await expect(measure(target, { kind: 'json', connections: 2, cache: 'miss' })).rejects.toThrow(/counted 0 chat requests, but 24 responses/);
  });

  it('when a response claims a cache hit but the stub was called anyway', async () => {
    const target = await fakeGateway({ callStub: true, cacheHeader: 'hit' });
    await expect(measure(target, { kind: 'json', connections: 2, cache: 'hit' })).rejects.toThrow(/counted 24 chat requests, but 0 responses/);
  });

  it('when the target is down', async () => {
    const target: BenchTarget = { ...direct(), endpoint: 'http://127.0.0.1:1/v1/chat/completions' };
    await expect(measure(target, { kind: 'json', connections: 1, cache: 'miss' })).rejects.toThrow(/request failed/);
  });
});

describe('cache accounting', () => {
  it('counts x-gateway-cache: hit responses, which need not reach the stub', async () => {
    const target = await fakeGateway({ callStub: false, cacheHeader: 'hit' });
    const run = await measure(target, { kind: 'json', connections: 2, cache: 'hit' });
    expect(run.record.stubHits).toBe(0);
    expect(run.record.hitRatio).toBe(1);
  });
});

describe('bodies and response checks', () => {
  it('distinct bodies differ per request and parse as JSON; identical ones do not change', () => {
    const distinct = bodyFactory({ kind: 'sse', bodyMode: 'distinct', model: MODEL, tag: 'r1' });
    expect(distinct(1)).not.toBe(distinct(2));
    expect(JSON.parse(distinct(1))).toMatchObject({ model: MODEL, stream: true, stream_options: { include_usage: true } });
    const same = bodyFactory({ kind: 'json', bodyMode: 'identical', model: undefined, tag: 'r1' });
    expect(same(1)).toBe(same(2));
    expect(JSON.parse(same(1))).not.toHaveProperty('model');
  });

  it('accepts good answers and names what is wrong with bad ones', () => {
    expect(checkResponse('json', 200, '{"choices":[]}')).toBeUndefined();
    expect(checkResponse('json', 429, '{"error":{}}')).toMatch(/^HTTP 429/);
    expect(checkResponse('json', 200, '{}')).toMatch(/without choices/);
    expect(checkResponse('sse', 200, 'data: {"choices":[]}\n\ndata: [DONE]\n\n')).toBeUndefined();
    expect(checkResponse('sse', 200, 'data: {"choices":[]}\n\n')).toMatch(/\[DONE\]/);
    expect(checkResponse('sse', 200, 'data: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n')).toMatch(/error event/);
  });
});

describe('streaming check', () => {
  it('passes a target that relays SSE events as they come', async () => {
    const { checkStreamsIncrementally } = await import('./streaming-check.js');
    const floor = await startFloorProxy(new URL(stub.url).origin);
    try {
      const check = await checkStreamsIncrementally(
        { name: 'floor', endpoint: `${floor.url}/v1/chat/completions`, headers: {}, model: MODEL, pid: undefined },
        new URL(stub.url).origin,
        'pass',
      );
      expect(check.chunks).toBeGreaterThan(1);
    } finally {
      await floor.close();
    }
  });

  it('fails a target that buffers the stream and sends it at the end', async () => {
    const { checkStreamsIncrementally } = await import('./streaming-check.js');
    const stubUrl = new URL(stub.url);
    const origin = await listen((req, res) => {
      const upstream = request(
        { host: stubUrl.hostname, port: stubUrl.port, method: 'POST', path: '/v1/chat/completions', headers: { 'content-type': 'application/json' } },
        (r) => {
          const parts: Buffer[] = [];
          r.on('data', (c: Buffer) => parts.push(c));
          r.on('end', () => {
            res.writeHead(200, { 'content-type': 'text/event-stream' });
            res.end(Buffer.concat(parts));
          });
        },
      );
      req.pipe(upstream);
    });
    const buffering: BenchTarget = { name: 'buffering', endpoint: `${origin}/v1/chat/completions`, headers: {}, model: MODEL, pid: undefined };
    await expect(checkStreamsIncrementally(buffering, stubUrl.origin, 'fail')).rejects.toThrow(/does not forward SSE events as they arrive/);
  });

  it('fails a target that relays the first content event live and holds back the rest until the end', async () => {
    const { checkStreamsIncrementally } = await import('./streaming-check.js');
    const stubUrl = new URL(stub.url);
    const origin = await listen((req, res) => {
      const upstream = request(
        { host: stubUrl.hostname, port: stubUrl.port, method: 'POST', path: '/v1/chat/completions', headers: { 'content-type': 'application/json' } },
        (r) => {
          res.writeHead(200, { 'content-type': 'text/event-stream' });
          const held: Buffer[] = [];
          let sentFirstContent = false;
          r.on('data', (c: Buffer) => {
            if (sentFirstContent) return void held.push(c);
            res.write(c);
            const text = c.toString('utf8');
            if (text.includes('"content":"') && !text.includes('"content":""')) sentFirstContent = true;
          });
          r.on('end', () => res.end(Buffer.concat(held)));
        },
      );
      req.pipe(upstream);
    });
    const halfBuffering: BenchTarget = { name: 'half-buffering', endpoint: `${origin}/v1/chat/completions`, headers: {}, model: MODEL, pid: undefined };
    await expect(checkStreamsIncrementally(halfBuffering, stubUrl.origin, 'half')).rejects.toThrow(/does not forward SSE events as they arrive/);
  });
});
