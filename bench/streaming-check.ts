/**
 * "Forwards each chunk as it arrives": with the stub pausing between SSE events, a target that
 * relays must deliver the events one by one, spread over time; one that buffers delivers them
 * (or all but the first) in a lump at the end. Checked once per target per run; a buffering
 * target fails the bench.
 */
import { performance } from 'node:perf_hooks';
import { request } from 'undici';
import { BenchFailure, type BenchTarget } from './measure.js';

const GAP_MS = 40;
const EVENTS = 6;

export interface StreamingCheck {
  target: string;
  /** Body chunks the client received, and how many distinct moments they came in. */
  chunks: number;
  /** ms from the first content chunk to the last one; ≈ (EVENTS − 1) × GAP_MS when relayed live. */
  spreadMs: number;
  expectedMs: number;
}

async function configureStub(stubOrigin: string, config: object): Promise<void> {
  const res = await fetch(`${stubOrigin}/__stub/config`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(config) });
  await res.arrayBuffer();
  if (res.status !== 200) throw new BenchFailure(`stub config answered HTTP ${res.status}`);
}

export async function checkStreamsIncrementally(target: BenchTarget, stubOrigin: string, tag: string): Promise<StreamingCheck> {
  await configureStub(stubOrigin, { chunkDelayMs: GAP_MS, completionTokens: EVENTS });
  try {
    const body = JSON.stringify({
      ...(target.model !== undefined ? { model: target.model } : {}),
      stream: true,
      messages: [{ role: 'user', content: `streaming check ${tag}` }],
    });
    const res = await request(target.endpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...target.headers },
      body,
      headersTimeout: 10_000,
      bodyTimeout: 10_000,
    });
    const arrivals: number[] = [];
    let text = '';
    for await (const chunk of res.body) {
      const piece = (chunk as Buffer).toString('utf8');
      // Only chunks carrying a content delta: the role and usage frames may come at other times.
      if (piece.includes('"content":"') && !piece.includes('"content":""')) arrivals.push(performance.now());
      text += piece;
    }
    if (res.statusCode !== 200 || !text.trimEnd().endsWith('data: [DONE]')) {
      throw new BenchFailure(`${target.name}: streaming check got HTTP ${res.statusCode}: ${text.slice(0, 200)}`);
    }
    const spreadMs = arrivals.length > 1 ? (arrivals.at(-1) as number) - arrivals[0] : 0;
    const expectedMs = (EVENTS - 1) * GAP_MS;
    const check: StreamingCheck = { target: target.name, chunks: arrivals.length, spreadMs, expectedMs };
    // Generous: a loaded machine delays timers, it does not make a relay deliver in a lump.
    // The count too: a relay that sends the first event live and holds the rest still has the full spread.
    if (spreadMs < expectedMs * 0.6 || arrivals.length < EVENTS - 1) {
      throw new BenchFailure(
        `${target.name} does not forward SSE events as they arrive: ${arrivals.length} content chunk(s) for ${EVENTS} events, within ${spreadMs.toFixed(1)} ms, ` +
          `while the upstream sent them one by one over ${expectedMs} ms`,
      );
    }
    return check;
  } finally {
    await configureStub(stubOrigin, {});
  }
}
