import { describe, expect, it } from 'vitest';
import type { CompletionMeta, PacedStreamSink } from '../completion/completion.types.js';
import { RecordingStreamSink } from './recording-stream-sink.js';

const META: CompletionMeta = {
  model: 'm',
  route: { requestedTaskType: 'general', ruleTaskType: 'general', version: 1, models: ['m'], maxTokens: 16, explicitModel: false },
  cache: 'miss',
  upstreamMock: false,
  headers: {},
};
const ROLE = '{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}';
const TEXT = '{"id":"c","choices":[{"index":0,"delta":{"content":"the word \\"error\\" is fine"},"finish_reason":null}]}';
// Parsed (it spells "error"), and kept: a token is not a failure.
const WORD = '{"id":"c","choices":[{"index":0,"delta":{"content":"error"},"finish_reason":null}]}';
const STOP = '{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}';

/** The client's sink as the pipeline sees it, writing into a list. */
class ListSink implements PacedStreamSink {
  readonly written: string[] = [];
  opened = false;
  done = false;
  closed = false;
  backedUp = false;
  open(): void {
    this.opened = true;
  }
  event(payload: string): void {
    this.written.push(payload);
  }
  close(): void {
    this.done = true;
  }
  drained(): Promise<void> {
    return Promise.resolve();
  }
}

function run(events: string[], end: 'close' | 'none' = 'close', maxChars?: number) {
  const client = new ListSink();
  const recorder = new RecordingStreamSink(client, maxChars);
  recorder.open(META);
  for (const e of events) recorder.event(e);
  if (end === 'close') recorder.close();
  return { client, recorder };
}

describe('RecordingStreamSink', () => {
  it('passes every event through and keeps them; the [DONE] waits until end()', () => {
    const { client, recorder } = run([ROLE, TEXT, WORD, STOP]);
    expect(client.written).toEqual([ROLE, TEXT, WORD, STOP]);
    expect(client.done).toBe(false);
    expect(recorder.recorded()).toEqual({ meta: META, events: [ROLE, TEXT, WORD, STOP] });
    recorder.end();
    expect(client.done).toBe(true);
  });

  it('keeps nothing of a stream that failed in-band, by the gateway or by the upstream', () => {
    const gatewayError = '{"error":{"message":"upstream cut","type":"upstream_error","code":"upstream_error","param":null}}';
    expect(run([ROLE, TEXT, gatewayError]).recorder.recorded()).toBeUndefined();
    const upstreamError = '{"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}';
    expect(run([ROLE, upstreamError, STOP]).recorder.recorded()).toBeUndefined();
  });

  it('keeps a stream whose chunks carry "error": null, as some upstreams send in every chunk', () => {
    const nullError = '{"id":"c","error":null,"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}';
    expect(run([ROLE, nullError, STOP]).recorder.recorded()).toEqual({ meta: META, events: [ROLE, nullError, STOP] });
  });

  it('keeps nothing of a stream the pipeline did not end (the client left), nor sends a [DONE] for it', () => {
    const { client, recorder } = run([ROLE, TEXT], 'none');
    expect(recorder.recorded()).toBeUndefined();
    recorder.end();
    expect(client.done).toBe(false);
    const gone = run([ROLE, TEXT, STOP]);
    gone.client.closed = true;
    expect(gone.recorder.recorded()).toBeUndefined();
  });

  it('keeps nothing of a stream longer than it may hold, and still passes it all through', () => {
    const { client, recorder } = run([ROLE, TEXT, STOP], 'close', ROLE.length + TEXT.length);
    expect(client.written).toEqual([ROLE, TEXT, STOP]);
    expect(recorder.recorded()).toBeUndefined();
  });

  it("is paced by the client's sink", () => {
    const client = new ListSink();
    const recorder = new RecordingStreamSink(client);
    expect(recorder.backedUp).toBe(false);
    client.backedUp = true;
    expect(recorder.backedUp).toBe(true);
    expect('drained' in recorder).toBe(true);
  });
});
