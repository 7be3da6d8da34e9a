import { MAX_PRICE_USD } from './admin/pricing-admin.dto.js';
import type { ModelPrice } from './pricing.js';

/**
 * A per-token USD price as OpenRouter prints it: a plain non-negative decimal ("0.00000015"), of
 * the size an admin may set (MAX_PRICE_USD per token, 30 fraction digits). A larger one is an
 * upstream's mistake: pricing a call with it would fail the call, so it is skipped like "-1".
 */
const DECIMAL_PRICE = /^\d{1,4}(\.\d{1,30})?$/;

export function isDecimalPrice(value: unknown): value is string {
  if (typeof value !== 'string') return false;
  const text = value.trim();
  return DECIMAL_PRICE.test(text) && Number(text) <= MAX_PRICE_USD;
}

/**
 * Reads the prices out of an OpenRouter-style `GET /models` body:
 * `{ data: [ { id, pricing: { prompt: "0.00000015", completion: "0.0000006", image: "0.007225", request: "0" } } ] }`
 * (`image` and `request` optional; see ModelPrice).
 * Entries without both prices, or with OpenRouter's "-1" (price decided per request, e.g.
 * `openrouter/auto`), are skipped: the static table or the fallback price covers them.
 */
export function parseModelsPrices(body: unknown): Map<string, ModelPrice> {
  const prices = new Map<string, ModelPrice>();
  const data = typeof body === 'object' && body !== null ? (body as { data?: unknown }).data : undefined;
  if (!Array.isArray(data)) return prices;
  for (const entry of data) {
    if (typeof entry !== 'object' || entry === null) continue;
    const { id, pricing } = entry as { id?: unknown; pricing?: unknown };
    if (typeof id !== 'string' || id === '' || typeof pricing !== 'object' || pricing === null) continue;
    const { prompt, completion, image, request } = pricing as { prompt?: unknown; completion?: unknown; image?: unknown; request?: unknown };
    if (!isDecimalPrice(prompt) || !isDecimalPrice(completion)) continue;
    const price: ModelPrice = { prompt: prompt.trim(), completion: completion.trim() };
    // Optional, and "0" on most models: kept only when they charge something.
    if (isDecimalPrice(image) && Number(image) > 0) price.image = image.trim();
    if (isDecimalPrice(request) && Number(request) > 0) price.request = request.trim();
    prices.set(id, price);
  }
  return prices;
}

export interface UpstreamPriceSource {
  baseUrl: string;
  apiKey: string;
  timeoutMs: number;
  headers?: Record<string, string>;
}

/** One `GET {base}/models`. Throws on any failure; the caller keeps the prices it has. */
export async function fetchUpstreamPrices(source: UpstreamPriceSource): Promise<Map<string, ModelPrice>> {
  const response = await fetch(`${source.baseUrl}/models`, {
    headers: { accept: 'application/json', authorization: `Bearer ${source.apiKey}`, ...source.headers },
    signal: AbortSignal.timeout(source.timeoutMs),
  });
  if (!response.ok) {
    await response.body?.cancel();
    throw new Error(`GET /models answered HTTP ${response.status}`);
  }
  return parseModelsPrices(await response.json());
}
