import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../config/config.js';

describe('budget and pricing configuration', () => {
  it('has bounded defaults: a 10-minute request deadline and a conservative price for unpriced models', () => {
    const config = loadConfig({});
    expect(config.budget).toEqual({ reservationTtlMs: 600_000, sweepIntervalMs: 60_000, flushMs: 20, flushBatch: 500, poolSize: 8, leaseMs: 2000, leaseRequests: 32 });
    expect(config.pricing).toEqual({ refreshMs: 3_600_000, fallbackPrompt: '0.000015', fallbackCompletion: '0.000075' });
  });

  it('reads the variables and names every bad one at once', () => {
    const config = loadConfig({
      BUDGET_RESERVATION_TTL_MS: '900000',
      PRICING_FALLBACK_COMPLETION_USD: '0.0001',
      BUDGET_FLUSH_MS: '50',
      BUDGET_FLUSH_BATCH: '100',
      BUDGET_POOL_SIZE: '4',
      BUDGET_LEASE_MS: '0',
      BUDGET_LEASE_REQUESTS: '8',
    });
    expect(config.budget).toMatchObject({ reservationTtlMs: 900_000, flushMs: 50, flushBatch: 100, poolSize: 4, leaseMs: 0, leaseRequests: 8 });
    expect(config.pricing.fallbackCompletion).toBe('0.0001');
    const error = (() => {
      try {
        loadConfig({
          PRICING_FALLBACK_PROMPT_USD: '-1',
          PRICING_FALLBACK_COMPLETION_USD: 'cheap',
          BUDGET_SWEEP_INTERVAL_MS: '0',
          BUDGET_FLUSH_MS: '0',
          BUDGET_POOL_SIZE: 'many',
          BUDGET_LEASE_REQUESTS: '1',
        });
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(error).toBeInstanceOf(ConfigError);
    const problems = (error as ConfigError).problems.join('\n');
    expect(problems).toContain('PRICING_FALLBACK_PROMPT_USD');
    expect(problems).toContain('PRICING_FALLBACK_COMPLETION_USD');
    expect(problems).toContain('BUDGET_SWEEP_INTERVAL_MS');
    expect(problems).toContain('BUDGET_FLUSH_MS');
    expect(problems).toContain('BUDGET_POOL_SIZE');
    expect(problems).toContain('BUDGET_LEASE_REQUESTS');
  });

  it('refuses a reservation deadline shorter than the upstream deadline (the sweeper would free money still in use)', () => {
    expect(() => loadConfig({ BUDGET_RESERVATION_TTL_MS: '60000', UPSTREAM_DEADLINE_MS: '120000' })).toThrow(
      /BUDGET_RESERVATION_TTL_MS .* UPSTREAM_DEADLINE_MS/,
    );
    // A lease is drawn on for BUDGET_LEASE_MS, and its last draw may take a whole deadline after that.
    expect(() => loadConfig({ BUDGET_RESERVATION_TTL_MS: '125000', UPSTREAM_DEADLINE_MS: '120000', BUDGET_LEASE_MS: '10000' })).toThrow(/BUDGET_LEASE_MS/);
    expect(loadConfig({ BUDGET_RESERVATION_TTL_MS: '125000', UPSTREAM_DEADLINE_MS: '120000', BUDGET_LEASE_MS: '2000' }).budget.reservationTtlMs).toBe(125_000);
  });
});
