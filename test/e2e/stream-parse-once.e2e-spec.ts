import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { postSse, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// A streamed cache miss reads every upstream event three ways: the driver checks it, the caller
// takes the model from the first, and the pipeline counts usage and assembles the answer for the
// cache. One parse per event serves all three (UpstreamEvents.parsed): each further JSON.parse of
// the same event was CPU on the hot path (BENCHMARKS.md, session 29). The answer the cache keeps,
// built from those shared objects, must still be the one the caller received.

const DRIVERS = ['undici', 'sdk'] as const;

/** The text the caller received: the content deltas of its events, in order. */
function contentOf(events: string[]): string {
  return events
    .filter((e) => e !== '[DONE]')
    .map((e) => (JSON.parse(e) as { choices?: Array<{ delta?: { content?: string } }> }).choices?.[0]?.delta?.content ?? '')
    .join('');
}

describe.each(DRIVERS)('a streamed cache miss parses each upstream event once (%s driver)', (driver) => {
  let gw: TestGateway;
  let tenant: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_DRIVER: driver } });
    tenant = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw.close();
  });

  it('and caches the very answer it streamed', async () => {
    const body = {
      model: 'openai/gpt-4o-mini',
      messages: [{ role: 'user', content: `parse once ${randomBytes(4).toString('hex')}` }],
      stream: true,
      stream_options: { include_usage: true },
    };
    const parse = vi.spyOn(JSON, 'parse');
    let miss: Awaited<ReturnType<typeof postSse>>;
    const parsesOf = new Map<string, number>();
    try {
      miss = await postSse(gw, tenant.key, body);
      for (const [text] of parse.mock.calls) {
        if (typeof text === 'string' && text.includes('"chat.completion.chunk"')) parsesOf.set(text, (parsesOf.get(text) ?? 0) + 1);
      }
    } finally {
      parse.mockRestore();
    }
    expect(miss.status).toBe(200);
    expect(miss.headers.get('x-gateway-cache')).toBe('miss');
    const relayed = miss.events.filter((e) => e !== '[DONE]');
    expect(relayed.length).toBeGreaterThan(2);
    expect(Object.fromEntries(relayed.map((e) => [e, parsesOf.get(e) ?? 0]))).toEqual(Object.fromEntries(relayed.map((e) => [e, 1])));

    const hit = await postSse(gw, tenant.key, body);
    expect(hit.headers.get('x-gateway-cache')).toBe('hit');
    expect(contentOf(hit.events)).toBe(contentOf(miss.events));
    expect(contentOf(miss.events)).toMatch(/^Mock reply to: parse once /);
  });
});
