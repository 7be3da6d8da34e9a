import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { plainDecimal } from './admin/pricing-admin.dto.js';
import { tokensCost } from '../../../libs/money/src/index.js';
import { fetchUpstreamPrices, parseModelsPrices } from './upstream-prices.js';

describe('prices from an OpenRouter-style /models', () => {
  it('keeps decimal per-token prices and skips entries it cannot use', () => {
    const prices = parseModelsPrices({
      data: [
        { id: 'openai/gpt-4o-mini', pricing: { prompt: '0.00000015', completion: '0.0000006', request: '0' } },
        { id: 'openrouter/auto', pricing: { prompt: '-1', completion: '-1' } },
        { id: 'broken/no-pricing' },
        { id: 'broken/number', pricing: { prompt: 1e-7, completion: '0.1' } },
        'nonsense',
      ],
    });
    expect([...prices]).toEqual([['openai/gpt-4o-mini', { prompt: '0.00000015', completion: '0.0000006' }]]);
    expect(parseModelsPrices({ error: 'nope' }).size).toBe(0);
  });

  it('keeps a per-image and a per-request price when the model charges one, for the budget worst case', () => {
    const prices = parseModelsPrices({
      data: [
        { id: 'openai/gpt-4o-mini', pricing: { prompt: '0.00000015', completion: '0.0000006', image: '0.007225', request: '0' } },
        { id: 'perplexity/sonar', pricing: { prompt: '0.000001', completion: '0.000001', image: '0', request: '0.005' } },
        { id: 'odd/image', pricing: { prompt: '0.000001', completion: '0.000001', image: '-1', request: 'free' } },
      ],
    });
    expect(prices.get('openai/gpt-4o-mini')).toEqual({ prompt: '0.00000015', completion: '0.0000006', image: '0.007225' });
    expect(prices.get('perplexity/sonar')).toEqual({ prompt: '0.000001', completion: '0.000001', request: '0.005' });
    expect(prices.get('odd/image')).toEqual({ prompt: '0.000001', completion: '0.000001' });
  });

  it('skips prices no call could be priced with (beyond what an admin may set), so they fall back like "-1"', () => {
    const absurd = `${'9'.repeat(70)}.5`;
    const prices = parseModelsPrices({
      data: [
        { id: 'huge/whole', pricing: { prompt: absurd, completion: '0.1' } },
        { id: 'huge/fraction', pricing: { prompt: `0.${'1'.repeat(40)}`, completion: '0.1' } },
        { id: 'over/cap', pricing: { prompt: '1000.5', completion: '0.1' } },
        { id: 'at/cap', pricing: { prompt: '1000', completion: '0.000001' } },
      ],
    });
    expect([...prices.keys()]).toEqual(['at/cap']);
    // The one kept prices a call: every price the parser keeps can be turned into a cost.
    expect(() => tokensCost(1_000_000, prices.get('at/cap')!.prompt)).not.toThrow();
    expect(() => tokensCost(1_000_000, absurd)).toThrow();
  });

  describe('over HTTP', () => {
    let server: Server;
    let baseUrl: string;
    let seenAuth: string | undefined;
    let status = 200;

    beforeAll(async () => {
      server = createServer((req, res) => {
        seenAuth = req.headers.authorization;
        if (req.url !== '/api/v1/models') {
          res.writeHead(404).end();
          return;
        }
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ data: [{ id: 'acme/one', pricing: { prompt: '0.000001', completion: '0.000002' } }] }));
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/api/v1`;
    });
    afterAll(async () => {
      await new Promise((resolve) => server.close(resolve));
    });

    it('fetches {base}/models with the upstream key', async () => {
      status = 200;
      const prices = await fetchUpstreamPrices({ baseUrl, apiKey: 'sk-upstream', timeoutMs: 2000 });
      expect(prices.get('acme/one')).toEqual({ prompt: '0.000001', completion: '0.000002' });
      expect(seenAuth).toBe('Bearer sk-upstream');
    });

    it('throws on an HTTP error, so the caller keeps the prices it has', async () => {
      status = 503;
      await expect(fetchUpstreamPrices({ baseUrl, apiKey: 'k', timeoutMs: 2000 })).rejects.toThrow('HTTP 503');
    });
  });
});

describe('admin price input', () => {
  it.each([
    ['0.00000015', '0.00000015'],
    [1.5e-7, '0.00000015'],
    [0.000002, '0.000002'],
    ['2e-6', '0.000002'],
    ['0', '0'],
    [3, '3'],
    ['00.50', '0.5'],
  ])('%j is the exact decimal %s', (input, expected) => {
    expect(plainDecimal(input)).toBe(expected);
  });

  it.each([-1, '-0.1', 'free', '', null, Number.NaN, '1e-40'])('%j is refused', (input) => {
    expect(plainDecimal(input)).toBeUndefined();
  });
});
