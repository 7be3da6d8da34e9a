import { parseUsd, tokensCost, type Nanos } from '../../../libs/money/src/index.js';
import { readTokenCount, type Usage } from '../../../libs/openai-contract/src/index.js';
import staticPrices from './static-prices.json' with { type: 'json' };

export interface ModelPrice {
  /** USD per token as a decimal string, exactly as published. */
  prompt: string;
  completion: string;
}

/**
 * Where a charged amount came from, recorded on every ledger row: `upstream` (its `usage.cost`),
 * `pricing_table` (tokens × a known price), `fallback_price` (tokens × the configured price for
 * models nobody priced), `estimate` (a stream cut before the upstream reported usage: charged
 * for the characters produced), `cache` (a cache hit, free), `none` (a failed attempt without
 * usage, free), `unpriced` (no price at all; only when no fallback is given).
 */
export type CostSource = 'upstream' | 'pricing_table' | 'fallback_price' | 'estimate' | 'cache' | 'unpriced' | 'none';

export interface Cost {
  nanos: Nanos;
  source: CostSource;
}

export function loadStaticPrices(): Record<string, ModelPrice> {
  const raw = staticPrices as Record<string, unknown>;
  const prices: Record<string, ModelPrice> = {};
  for (const [model, value] of Object.entries(raw)) {
    if (model.startsWith('_')) continue;
    prices[model] = value as ModelPrice;
  }
  return prices;
}

/**
 * Cost of one upstream attempt (API.md "Decisions"): the upstream's reported `usage.cost` when
 * present (converted once, rounded to the nano), else tokens × the price table, else 0 with the
 * source saying so, so reports can show what was not priced.
 */
export function costOf(usage: Usage | undefined, price: ModelPrice | undefined): Cost {
  if (!usage) return { nanos: 0n, source: 'none' };
  if (usage.cost !== undefined) {
    const nanos = parseUsd(usage.cost);
    if (nanos !== undefined && nanos >= 0n) return { nanos, source: 'upstream' };
  }
  if (!price) return { nanos: 0n, source: 'unpriced' };
  // readUsage hands out whole, non-negative counts; a Usage built elsewhere must still not make a
  // settle throw (BigInt of a fraction) or charge a negative amount: an unusable count counts 0.
  const prompt = readTokenCount(usage.prompt_tokens) ?? 0;
  const completion = readTokenCount(usage.completion_tokens) ?? 0;
  return { nanos: tokensCost(prompt, price.prompt) + tokensCost(completion, price.completion), source: 'pricing_table' };
}
