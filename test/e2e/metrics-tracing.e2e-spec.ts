import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApiClient, leaveMidway, startTestGateway, type TestGateway } from '../support/gateway.js';

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  attributes: Record<string, unknown>;
}

/** OTLP/JSON may carry ids as hex or base64; compare them as hex. */
function hexId(id: string | undefined): string | undefined {
  if (!id) return undefined;
  return /^[0-9a-f]+$/i.test(id) && (id.length === 32 || id.length === 16) ? id.toLowerCase() : Buffer.from(id, 'base64').toString('hex');
}

/** A stand-in OpenTelemetry collector: records what arrives on POST /v1/traces (OTLP/HTTP JSON). */
async function startCollector(): Promise<{ url: string; spans: OtlpSpan[]; bodies: string[]; server: Server }> {
  const spans: OtlpSpan[] = [];
  const bodies: string[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString('utf8')));
    req.on('end', () => {
      if (req.url === '/v1/traces') {
        bodies.push(body);
        const parsed = JSON.parse(body) as {
          resourceSpans: Array<{
            scopeSpans: Array<{
              spans: Array<{
                traceId: string;
                spanId: string;
                parentSpanId?: string;
                name: string;
                attributes?: Array<{ key: string; value: Record<string, unknown> }>;
              }>;
            }>;
          }>;
        };
        for (const rs of parsed.resourceSpans) {
          for (const ss of rs.scopeSpans) {
            for (const s of ss.spans) {
              const attributes: Record<string, unknown> = {};
              for (const a of s.attributes ?? []) attributes[a.key] = Object.values(a.value)[0];
              spans.push({ traceId: hexId(s.traceId) ?? '', spanId: hexId(s.spanId) ?? '', parentSpanId: hexId(s.parentSpanId), name: s.name, attributes });
            }
          }
        }
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, spans, bodies, server };
}

describe('tracing with OTEL_EXPORTER_OTLP_ENDPOINT', () => {
  let collector: Awaited<ReturnType<typeof startCollector>>;
  let gw: TestGateway;

  beforeAll(async () => {
    collector = await startCollector();
    gw = await startTestGateway({ env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.url } });
  });
  afterAll(async () => {
    await new Promise((resolve) => collector.server.close(resolve));
  });

  it("continues the caller's trace: HTTP span → completion span → upstream attempt, exported on shutdown, without secrets", async () => {
    const alice = await gw.tenants.create();
    const traceId = randomBytes(16).toString('hex');
    const callerSpanId = randomBytes(8).toString('hex');
    const res = await alice.api.post(
      '/v1/chat/completions',
      { model: 'auto', messages: [{ role: 'user', content: 'trace me' }] },
      { traceparent: `00-${traceId}-${callerSpanId}-01` },
    );
    expect(res.status).toBe(200);
    // A key where a path segment goes (a base URL with the key in it, a key passed as a job id):
    // the spans' url.path must not carry it.
    expect((await new ApiClient(gw.url, undefined).get(`/v1/${alice.key}/models`)).status).toBe(404);
    expect((await alice.api.get(`/v1/jobs/${alice.key}`)).status).toBe(404);
    // Closing the gateway flushes the batched spans to the collector.
    await gw.close();

    const mine = collector.spans.filter((s) => s.traceId === traceId);
    const http = mine.find((s) => s.name === 'POST /v1/chat/completions');
    const completion = mine.find((s) => s.name === 'gatehouse.completion');
    const attempt = mine.find((s) => s.name === 'gatehouse.upstream_attempt');
    expect(http?.parentSpanId).toBe(callerSpanId);
    expect(http?.attributes['http.response.status_code']).toBeDefined();
    expect(completion?.parentSpanId).toBe(http?.spanId);
    expect(completion?.attributes).toMatchObject({ 'gen_ai.response.model': 'openai/gpt-4o-mini', 'gatehouse.door': 'chat', 'gatehouse.outcome': 'ok' });
    expect(attempt?.parentSpanId).toBe(completion?.spanId);
    expect(attempt?.attributes).toMatchObject({ 'gen_ai.request.model': 'openai/gpt-4o-mini', 'gatehouse.outcome': 'ok' });

    const exported = collector.bodies.join('\n');
    expect(exported).not.toContain(alice.key);
    expect(exported).not.toContain('sk-test-upstream-secret');
    expect(exported).not.toContain(gw.adminKey);
  });
});

describe('tracing: a caller that leaves after its body was read', () => {
  let collector: Awaited<ReturnType<typeof startCollector>>;
  let gw: TestGateway;

  beforeAll(async () => {
    collector = await startCollector();
    gw = await startTestGateway({ env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.url, UPSTREAM_RETRY_ATTEMPTS: '1' } });
  });
  afterAll(async () => {
    await new Promise((resolve) => collector.server.close(resolve));
  });

  // Neither onResponse nor onRequestAbort runs for such a request: its HTTP span was never ended,
  // and its completion span pointed to a parent no collector ever received.
  it('still exports the HTTP span (499 when nothing was sent) of a JSON call and of a stream it left', async () => {
    const erin = await gw.tenants.create();
    const traces: string[] = [];
    const leave = async (body: Record<string, unknown>, afterFirstChunk: boolean) => {
      const traceId = randomBytes(16).toString('hex');
      traces.push(traceId);
      await leaveMidway(gw, erin.key, body, { afterFirstChunk, headers: { traceparent: `00-${traceId}-${randomBytes(8).toString('hex')}-01` } });
    };
    gw.stub.configure({ latencyMs: 1500 });
    await leave({}, false);
    gw.stub.configure({ latencyMs: 0, chunkDelayMs: 300, completionTokens: 20 });
    await leave({ stream: true }, true);
    // Closing the gateway drains both calls and flushes the batched spans to the collector.
    await gw.close();

    const found = traces.map((traceId) => {
      const mine = collector.spans.filter((s) => s.traceId === traceId);
      const http = mine.find((s) => s.name === 'POST /v1/chat/completions');
      const completion = mine.find((s) => s.name === 'gatehouse.completion');
      return { status: http?.attributes['http.response.status_code'], completionUnderHttp: completion !== undefined && completion.parentSpanId === http?.spanId };
    });
    expect(found).toEqual([
      { status: 499, completionUnderHttp: true },
      { status: 200, completionUnderHttp: true },
    ]);
  });
});
