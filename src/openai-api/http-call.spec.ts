import { EventEmitter, getEventListeners } from 'node:events';
import { createServer, type IncomingMessage, request, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { FastifyReply } from 'fastify';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { CompletionMeta } from '../completion/completion.types.js';
import { ReplyStreamSink, type StreamPacing } from './http-call.js';

const META: CompletionMeta = {
  model: 'm',
  route: { requestedTaskType: 'general', ruleTaskType: 'general', version: 1, models: ['m'], maxTokens: 16, explicitModel: false },
  cache: 'miss',
  upstreamMock: false,
  headers: {},
};
const BIG_EVENT = JSON.stringify({ pad: 'x'.repeat(64 * 1024) });

const servers: Server[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
});

interface Backed {
  sink: ReplyStreamSink;
  res: ServerResponse;
  /** The client's response: paused, nothing read until the test resumes it. */
  client: IncomingMessage;
}

/** A real loopback HTTP stream whose client does not read, fed until its socket is backed up. */
async function backedUpSink(pacing: StreamPacing = ReplyStreamSink.DEFAULT_PACING): Promise<Backed> {
  let served!: (value: { sink: ReplyStreamSink; res: ServerResponse }) => void;
  const serving = new Promise<{ sink: ReplyStreamSink; res: ServerResponse }>((resolve) => (served = resolve));
  const server = createServer((_req, res) => {
    const sink = new ReplyStreamSink({ raw: res, getHeaders: () => ({}) } as unknown as FastifyReply, pacing);
    sink.open(META);
    served({ sink, res });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const clientResponse = new Promise<IncomingMessage>((resolve, reject) => {
    const req = request({ port: (server.address() as AddressInfo).port, host: '127.0.0.1', agent: false }, resolve);
    req.on('error', () => undefined);
    req.end();
    req.on('response', (res) => res.on('error', () => undefined));
    setTimeout(() => reject(new Error('no response')), 5000).unref();
  });
  const { sink, res } = await serving;
  expect(sink.backedUp).toBe(false);
  // Nothing to wait for while the client keeps up: no promise of its own, no listener.
  const drainListeners = res.listenerCount('drain');
  await sink.drained(new AbortController().signal);
  expect(res.listenerCount('drain')).toBe(drainListeners);
  let heldBeforePacing = 0;
  for (let i = 0; i < 4096 && !sink.backedUp; i++) {
    if (res.writableNeedDrain) heldBeforePacing = Math.max(heldBeforePacing, res.writableLength);
    sink.event(BIG_EVENT);
    // The write happens at the end of the tick.
    await new Promise((resolve) => setImmediate(resolve));
  }
  expect(sink.backedUp).toBe(true);
  // The socket said "behind" long before: an answer of ordinary size is held whole, not paced.
  if (pacing.bufferBytes > 0) expect(heldBeforePacing).toBeGreaterThan(0);
  expect(heldBeforePacing).toBeLessThanOrEqual(pacing.bufferBytes);
  return { sink, res, client: await clientResponse };
}

/** Whether `promise` has settled by the next macrotask. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  void promise.then(() => (done = true));
  await new Promise((resolve) => setTimeout(resolve, 20));
  return done;
}

function listeners(res: ServerResponse, signal: AbortSignal): number[] {
  return [res.listenerCount('drain'), res.listenerCount('close'), getEventListeners(signal, 'abort').length];
}

describe('ReplyStreamSink back-pressure', () => {
  it('is backed up while the client does not read, and drained once it reads; the wait leaves no listener behind', async () => {
    const { sink, res, client } = await backedUpSink();
    const signal = new AbortController().signal;
    const before = listeners(res, signal);
    const waiting = sink.drained(signal);
    expect(await settled(waiting)).toBe(false);
    expect(listeners(res, signal)).toEqual([before[0] + 1, before[1] + 1, 1]);

    client.resume();
    await waiting;
    expect(sink.backedUp).toBe(false);
    expect(sink.closed).toBe(false);
    expect(listeners(res, signal)).toEqual(before);
  });

  it('ends the wait when the client leaves, and reads as closed', async () => {
    const { sink, res, client } = await backedUpSink();
    const signal = new AbortController().signal;
    const before = listeners(res, signal);
    const waiting = sink.drained(signal);
    expect(await settled(waiting)).toBe(false);

    client.destroy();
    await waiting;
    expect(sink.closed).toBe(true);
    expect(sink.backedUp).toBe(false);
    // The sink's own once('close') went with the close.
    expect(listeners(res, signal)).toEqual([before[0], before[1] - 1, 0]);
  });

  it("ends the wait when the call's signal aborts (the shutdown deadline), with the client still connected and still behind", async () => {
    const { sink, res } = await backedUpSink();
    const controller = new AbortController();
    const before = listeners(res, controller.signal);
    const waiting = sink.drained(controller.signal);
    expect(await settled(waiting)).toBe(false);

    controller.abort();
    await waiting;
    expect(sink.closed).toBe(false);
    expect(sink.backedUp).toBe(true);
    expect(listeners(res, controller.signal)).toEqual(before);
    // An aborted signal never waits.
    expect(await settled(sink.drained(controller.signal))).toBe(true);
  });

  it('disconnects a client that takes nothing for stallMs while paced, and ends the wait', async () => {
    const { sink, res, client } = await backedUpSink({ bufferBytes: ReplyStreamSink.DEFAULT_PACING.bufferBytes, stallMs: 300 });
    const signal = new AbortController().signal;
    const before = listeners(res, signal);
    const waiting = sink.drained(signal);
    expect(await settled(waiting)).toBe(false);

    await waiting;
    expect(sink.closed).toBe(true);
    expect(res.socket?.destroyed ?? true).toBe(true);
    if (!res.closed) await new Promise((resolve) => res.once('close', resolve));
    expect(listeners(res, signal)).toEqual([before[0], before[1] - 1, 0]);
    // The client, once it reads again, finds the connection cut: its response never completes.
    const ending = new Promise<boolean>((resolve) => {
      client.once('end', () => resolve(client.complete));
      client.once('close', () => resolve(client.complete));
    });
    client.resume();
    expect(await ending).toBe(false);
  });

  it('keeps a paced client that takes something within every stallMs, however little: only one that takes nothing is a stall', async () => {
    vi.useFakeTimers();
    try {
      // A socket whose buffer the test empties by hand: what the client takes, when.
      const raw = Object.assign(new EventEmitter(), { writableNeedDrain: true, writableLength: 4_000_000, destroyed: false, destroy: vi.fn() });
      const sink = new ReplyStreamSink({ raw, getHeaders: () => ({}) } as unknown as FastifyReply, { bufferBytes: 1024 * 1024, stallMs: 300 });
      const waiting = sink.drained(new AbortController().signal);
      for (let i = 0; i < 10; i++) {
        raw.writableLength -= 1000;
        await vi.advanceTimersByTimeAsync(300);
      }
      expect(raw.destroy).not.toHaveBeenCalled();
      expect(sink.closed).toBe(false);
      await vi.advanceTimersByTimeAsync(600);
      expect(raw.destroy).toHaveBeenCalledOnce();
      expect(sink.closed).toBe(true);
      await waiting;
      expect([raw.listenerCount('drain'), raw.listenerCount('close')]).toEqual([0, 1]);
    } finally {
      vi.useRealTimers();
    }
  });
});

describe('ReplyStreamSink framing', () => {
  it('sends an event whose JSON holds raw line breaks (an upstream event over several `data:` lines) as one `data:` line, its value unchanged', () => {
    const written: string[] = [];
    const raw = Object.assign(new EventEmitter(), { destroyed: false, writeHead: vi.fn(), end: (body: string) => void written.push(body) });
    const sink = new ReplyStreamSink({ raw, getHeaders: () => ({}) } as unknown as FastifyReply);
    sink.open(META);
    // Escaped line breaks in a string are text, not line ends: they must reach the client as sent.
    const value = { id: 'c1', choices: [{ index: 0, delta: { content: 'a\nb\r\n' } }] };
    // Pretty-printed, as the parser joins the `data:` lines of one event; and with a bare CR, which
    // an SSE reader takes as a line end too.
    sink.event(JSON.stringify(value, null, 2));
    sink.event(JSON.stringify(value).replace(',', ',\r'));
    sink.close();
    // Read as an SSE client does: every line a field, each event's data on its one `data:` line.
    const lines = written
      .join('')
      .split(/\r\n|\r|\n/)
      .filter((line) => line !== '');
    expect(lines.every((line) => line.startsWith('data: '))).toBe(true);
    const data = lines.map((line) => line.slice('data: '.length));
    expect(data).toHaveLength(3);
    expect(data.slice(0, 2).map((d) => JSON.parse(d) as unknown)).toEqual([value, value]);
    expect(data[2]).toBe('[DONE]');
  });
});
