import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ledgerRows } from '../integration/budget-support.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

// A stream cut before the upstream reported its usage is charged "for what was produced"
// (API.md "Decisions"), estimated from what the client received, as UTF-8 bytes ÷ 3 like the
// prompt (estimate.ts: CJK runs ~3 bytes, about one token, per character). Counted in UTF-16
// units, CJK text was charged a third of that; reasoning sent as `reasoning_content` (DeepSeek,
// vLLM and other OpenAI-compatible servers) was not counted at all.

const MINI = 'openai/gpt-4o-mini';
const FRESH = { 'cache-control': 'no-cache, no-store' };

function chunk(delta: Record<string, unknown>): string {
  return `data: ${JSON.stringify({ id: 'c1', object: 'chat.completion.chunk', created: 1, model: MINI, choices: [{ index: 0, delta, finish_reason: null }] })}\n\n`;
}

describe('a cut stream charged for what it produced', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway();
  });
  afterAll(async () => {
    await gw?.close();
  });

  /** The stub sends `pieces` deltas, then drops the connection before any usage chunk. */
  function cutAfter(deltas: Array<Record<string, unknown>>): void {
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      void (async () => {
        res.write(chunk({ role: 'assistant', content: '' }));
        for (const delta of deltas) {
          res.write(chunk(delta));
          await new Promise((resolve) => setTimeout(resolve, 2));
        }
        res.socket?.destroy();
      })();
      return true;
    };
  }

  async function streamAndRead(key: string, userId: string) {
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...FRESH },
      body: JSON.stringify({ model: MINI, stream: true, max_tokens: 2000, messages: [{ role: 'user', content: 'write' }] }),
    });
    expect(res.status).toBe(200);
    const text = await res.text();
    const rows = await pollUntil(async () => {
      const r = await ledgerRows(gw, 'user', userId);
      expect(r).toHaveLength(1);
      return r;
    });
    return { text, row: rows[0] };
  }

  it('charges a cut stream of CJK text at least one token per character produced (estimate.ts: CJK ≈ 1 token per character)', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 5, period: 'monthly' });
    // 600 common CJK characters (each one token or more in every tokenizer the models use).
    const piece = '我们今天在这里讨论一个很重要的问题然后继续写下去'; // 24 characters
    cutAfter(Array.from({ length: 25 }, () => ({ content: piece })));
    const { text, row } = await streamAndRead(t.key, t.userId);
    expect(text).toContain(piece);
    expect(row.cost_source).toBe('estimate');
    // 600 characters (1,800 UTF-8 bytes) reached the client: 600 tokens, as the prompt estimate
    // would count the same text.
    const produced = Buffer.byteLength(piece.repeat(25)) / 3;
    expect(produced).toBe(600);
    expect(row.completion_tokens).toBeGreaterThanOrEqual(produced);
  });

  it('charges a cut stream of reasoning sent as `reasoning_content` (DeepSeek / vLLM / OpenAI-compatible servers) for what it produced', async () => {
    const t = await gw.tenants.create({ userBudgetUsd: 5, period: 'monthly' });
    const piece = 'Let me think about this step by step, considering every case carefully. ';
    cutAfter(Array.from({ length: 20 }, () => ({ reasoning_content: piece })));
    const { text, row } = await streamAndRead(t.key, t.userId);
    // The client got the reasoning...
    expect(text).toContain('reasoning_content');
    expect(row.cost_source).toBe('estimate');
    // ...~1,440 characters of it: charged for them.
    expect(row.completion_tokens).toBeGreaterThan(0);
    expect(BigInt(row.cost_nanos)).toBeGreaterThan(0n);
  });
});
