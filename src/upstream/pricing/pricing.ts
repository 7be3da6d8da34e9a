import { parseUsd, tokensCost, type Nanos } from '../../../libs/money/src/index.js';
import { readTokenCount, type Usage } from '../../../libs/openai-contract/src/index.js';
import staticPrices from './static-prices.json' with { type: 'json' };

export interface ModelPrice {
  /** USD per token as a decimal string, exactly as published. */
  prompt: string;
  completion: string;
  /**
   * USD per input image, as OpenRouter publishes it (`pricing.image`): what the largest image
   * costs on that model. Read only for the budget's worst case: the tokens an image is billed as
   * differ by model by 30× (gpt-4o-mini counts 2,833 + 5,667 per 512 px tile, gpt-4o 85 + 170), so
   * a flat token allowance let one request of a few images spend many times a budget.
   */
  image?: string;
  /** USD per request (`pricing.request`), for models that charge one; added to the cost. */
  request?: string;
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
  return { nanos: tokensCost(prompt, price.prompt) + tokensCost(completion, price.completion) + requestFee(price), source: 'pricing_table' };
}

/** A model's per-request fee in nano-dollars (0 when it charges none). */
export function requestFee(price: ModelPrice): Nanos {
  if (price.request === undefined) return 0n;
  const fee = parseUsd(price.request);
  return fee !== undefined && fee > 0n ? fee : 0n;
}
