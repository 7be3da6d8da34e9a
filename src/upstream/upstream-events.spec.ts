import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../../libs/stub-upstream/src/index.js';
import type { LlmClient, UpstreamEvents } from './llm-client.js';
import { OpenAiSdkLlmClient } from './openai-sdk-llm-client.js';
import { UndiciLlmClient } from './undici-llm-client.js';

// Both drivers parse every stream event to check it; the pipeline reads that parse
// (UpstreamEvents.parsed) rather than parsing each event again on a streamed miss. Whatever it
// hands out must be the parse of the very payload it is asked about: a parse of another event
// would be recorded, priced and cached as this one.

const drivers: Array<[string, (baseUrl: string) => LlmClient]> = [
  ['undici', (baseUrl) => new UndiciLlmClient({ baseUrl, apiKey: 'sk-events-0123456789', timeoutMs: 5000, extraHeaders: {}, connections: 2 })],
  ['sdk', (baseUrl) => new OpenAiSdkLlmClient({ baseUrl, apiKey: 'sk-events-0123456789', timeoutMs: 5000, extraHeaders: {} })],
];

const body = {
  model: 'openai/gpt-4o-mini',
  messages: [{ role: 'user', content: 'stream a few words to check each parse' }],
  max_tokens: 64,
  stream: true,
  stream_options: { include_usage: true },
};

describe.each(drivers)('%s driver: its parse of each streamed event', (_name, create) => {
  let stub: StubUpstream;
  let client: LlmClient;
  beforeAll(async () => {
    stub = await startStubUpstream({ recordRequests: false });
    client = create(stub.url);
  });
  afterAll(async () => {
    await client.close();
    await stub.close();
  });

  async function open(): Promise<UpstreamEvents> {
    return client.stream({ body, requestId: 'req-events', signal: new AbortController().signal });
  }

  it('hands out, for the event it yielded last, exactly what parsing that event gives', async () => {
    const events = await open();
    const seen: string[] = [];
    for await (const payload of events) {
      expect(events.parsed(payload)).toEqual(JSON.parse(payload));
      seen.push(payload);
    }
    expect(seen.length).toBeGreaterThan(2);
  });

  it('hands out, for an event yielded earlier, the parse of that event and not of the last one', async () => {
    const events = await open();
    const iterator = events[Symbol.asyncIterator]();
    const first = await iterator.next();
    const second = await iterator.next();
    expect(first.done === false && second.done === false).toBe(true);
    const [a, b] = [first.value as string, second.value as string];
    expect(a).not.toBe(b);
    expect(events.parsed(b)).toEqual(JSON.parse(b));
    expect(events.parsed(a)).toEqual(JSON.parse(a));
    expect(events.parsed(a)).not.toEqual(events.parsed(b));
    // Still the driver's own object for the last one, after the other was asked about.
    expect(events.parsed(b)).toBe(events.parsed(b));
    await iterator.return?.();
  });
});
