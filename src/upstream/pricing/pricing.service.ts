import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { AppConfig } from '../../config/config.js';
import { Clock } from '../../core/clock.js';
import { GatewayError } from '../../core/errors.js';
import { AppLogger } from '../../core/logger.js';
import { loadStaticPrices, type ModelPrice } from './pricing.js';
import { fetchUpstreamPrices } from './upstream-prices.js';

/** Which table a price came from, highest precedence first. */
export type PriceSource = 'override' | 'upstream' | 'static' | 'fallback';

export interface PriceEntry extends ModelPrice {
  model: string;
  source: PriceSource;
  /** Set for admin overrides. */
  updatedAt?: string;
  updatedBy?: string;
}

interface OverrideRow {
  model: string;
  prompt: string;
  completion: string;
  updated_at: Date | string;
  updated_by: string;
}

/**
 * Overrides are few and change by hand; re-reading them this often lets an admin's change reach
 * every instance within seconds for one tiny query, with no broadcast channel to run.
 */
const OVERRIDES_RELOAD_MS = 5000;
/** After a failed /models fetch, try again sooner than the normal refresh. */
const RETRY_AFTER_FAILURE_MS = 60_000;
const FETCH_TIMEOUT_MS = 10_000;

/**
 * Per-token prices, held in memory so the hot path never waits on a price: an admin override,
 * else the upstream's own `GET /models` price (OpenRouter publishes them; refreshed every
 * PRICING_REFRESH_MS in the background), else the static file, else the configured fallback
 * price, which keeps every reservation bounded even for a model nobody has priced.
 */
@Injectable()
export class PricingService implements OnModuleInit, OnApplicationShutdown {
  private readonly logger: Logger;
  private readonly staticPrices: Map<string, ModelPrice>;
  private upstreamPrices = new Map<string, ModelPrice>();
  private overrides = new Map<string, PriceEntry>();
  /** The merged view the hot path reads: one Map lookup per model. */
  private effective = new Map<string, PriceEntry>();
  readonly fallback: PriceEntry;
  private upstreamRefreshedAt: Date | undefined;
  private nextUpstreamAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  private upstreamFetch: Promise<void> | undefined;

  constructor(
    private readonly dataSource: DataSource,
    private readonly config: AppConfig,
    private readonly clock: Clock,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'Pricing' });
    this.staticPrices = new Map(Object.entries(loadStaticPrices()));
    this.fallback = { model: '*', source: 'fallback', prompt: config.pricing.fallbackPrompt, completion: config.pricing.fallbackCompletion };
    this.rebuild();
  }

  async onModuleInit(): Promise<void> {
    await this.reloadOverrides();
    // In the background: a slow or absent upstream must not delay the start; until it answers,
    // the static file prices the same models.
    void this.refreshUpstream();
    this.timer = setInterval(() => void this.tick(), OVERRIDES_RELOAD_MS);
    this.timer.unref();
  }

  onApplicationShutdown(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** The price to charge for `model`; never undefined (the fallback price at worst). */
  priceOf(model: string): PriceEntry {
    return this.effective.get(model) ?? this.fallback;
  }

  /** The price in force for `model`, named as asked: the fallback entry itself is named `*`. */
  entryFor(model: string): PriceEntry {
    const price = this.priceOf(model);
    return price.model === model ? price : { ...price, model };
  }

  list(): { data: PriceEntry[]; fallback: PriceEntry; upstreamRefreshedAt: Date | undefined } {
    const data = [...this.effective.values()].sort((a, b) => a.model.localeCompare(b.model));
    return { data, fallback: this.fallback, upstreamRefreshedAt: this.upstreamRefreshedAt };
  }

  async setOverride(model: string, price: ModelPrice, actor: string): Promise<PriceEntry> {
    const now = this.clock.now();
    await this.dataSource.query(
      `INSERT INTO model_price_overrides (model, prompt, completion, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (model) DO UPDATE SET prompt = EXCLUDED.prompt, completion = EXCLUDED.completion, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by`,
      [model, price.prompt, price.completion, now.toISOString(), actor],
    );
    const entry: PriceEntry = { model, source: 'override', prompt: price.prompt, completion: price.completion, updatedAt: now.toISOString(), updatedBy: actor };
    this.overrides.set(model, entry);
    this.rebuild();
    return entry;
  }

  async deleteOverride(model: string): Promise<PriceEntry> {
    const rows = await this.dataSource.query<unknown[]>(`DELETE FROM model_price_overrides WHERE model = $1 RETURNING model`, [model]);
    // DELETE … RETURNING comes back from TypeORM as [rows, count].
    const deleted = Array.isArray(rows[0]) ? (rows[0] as unknown[]).length : rows.length;
    if (deleted === 0) throw new GatewayError('not_found', `No price override for model '${model}'.`);
    this.overrides.delete(model);
    this.rebuild();
    return this.entryFor(model);
  }

  /** Fetches the upstream's /models now; concurrent calls share one fetch. */
  refreshUpstream(): Promise<void> {
    this.upstreamFetch ??= this.fetchUpstream().finally(() => {
      this.upstreamFetch = undefined;
    });
    return this.upstreamFetch;
  }

  async reloadOverrides(): Promise<void> {
    const rows = await this.dataSource.query<OverrideRow[]>('SELECT model, prompt, completion, updated_at, updated_by FROM model_price_overrides');
    const next = new Map<string, PriceEntry>();
    for (const row of rows) {
      next.set(row.model, {
        model: row.model,
        source: 'override',
        prompt: row.prompt,
        completion: row.completion,
        updatedAt: new Date(row.updated_at).toISOString(),
        updatedBy: row.updated_by,
      });
    }
    this.overrides = next;
    this.rebuild();
  }

  private tick(): Promise<void> {
    this.ticking ??= (async () => {
      try {
        await this.reloadOverrides();
      } catch (error) {
        this.logger.warn({ err: (error as Error).message }, 'price overrides reload failed; keeping current prices');
      }
      if (this.clock.nowMs() >= this.nextUpstreamAt) await this.refreshUpstream();
    })().finally(() => {
      this.ticking = undefined;
    });
    return this.ticking;
  }

  private async fetchUpstream(): Promise<void> {
    // The built-in mock has no prices of its own worth fetching, and its base URL is not the
    // configured one (which may point at the internet); the static file covers it.
    if (this.config.upstream.mock || this.config.upstream.apiKey === undefined) {
      this.nextUpstreamAt = Number.POSITIVE_INFINITY;
      return;
    }
    try {
      const prices = await fetchUpstreamPrices({
        baseUrl: this.config.upstream.baseUrl,
        apiKey: this.config.upstream.apiKey,
        timeoutMs: FETCH_TIMEOUT_MS,
        headers: { 'HTTP-Referer': this.config.upstream.referer, 'X-Title': this.config.upstream.title },
      });
      if (prices.size > 0) {
        this.upstreamPrices = prices;
        this.upstreamRefreshedAt = this.clock.now();
        this.rebuild();
      }
      this.nextUpstreamAt = this.clock.nowMs() + this.config.pricing.refreshMs;
      this.logger.debug({ models: prices.size }, 'upstream prices refreshed');
    } catch (error) {
      this.nextUpstreamAt = this.clock.nowMs() + Math.min(RETRY_AFTER_FAILURE_MS, this.config.pricing.refreshMs);
      // The message never holds the key: it is only in a request header.
      this.logger.warn({ err: (error as Error).message }, 'upstream /models prices unavailable; using the static table');
    }
  }

  private rebuild(): void {
    const merged = new Map<string, PriceEntry>();
    for (const [model, price] of this.staticPrices) merged.set(model, { ...price, model, source: 'static' });
    // An upstream price or an override sets the token prices; a per-image or per-request price it
    // does not give is kept from the table below it (the budget's worst case must not lose it).
    for (const [model, price] of this.upstreamPrices) merged.set(model, withFees({ ...price, model, source: 'upstream' }, merged.get(model)));
    for (const [model, entry] of this.overrides) merged.set(model, withFees(entry, merged.get(model)));
    this.effective = merged;
  }
}

function withFees(entry: PriceEntry, below: PriceEntry | undefined): PriceEntry {
  if (below === undefined || (below.image === undefined && below.request === undefined)) return entry;
  return { ...entry, image: entry.image ?? below.image, request: entry.request ?? below.request };
}
