import { describe, expect, it } from 'vitest';
import { type AppConfig, loadConfig } from '../config/config.js';
import { MetricsAccess } from './metrics-access.js';

const config = (env: Record<string, string>): AppConfig => loadConfig(env);

describe('MetricsAccess', () => {
  it('lets anyone scrape when METRICS_TOKEN is unset', () => {
    expect(new MetricsAccess(config({})).allows(undefined)).toBe(true);
  });

  it('wants exactly the bearer token when METRICS_TOKEN is set', () => {
    const access = new MetricsAccess(config({ METRICS_TOKEN: 'a-long-metrics-token' }));
    expect(access.allows('Bearer a-long-metrics-token')).toBe(true);
    expect(access.allows('bearer a-long-metrics-token')).toBe(true);
    expect(access.allows(undefined)).toBe(false);
    expect(access.allows('Bearer a-long-metrics-toke')).toBe(false);
    expect(access.allows('a-long-metrics-token')).toBe(false);
    expect(access.allows('Basic a-long-metrics-token')).toBe(false);
  });

  it('refuses to start with a short token, and reads the operations variables', () => {
    expect(() => config({ METRICS_TOKEN: 'short' })).toThrow(/METRICS_TOKEN must be at least 16 characters/);
    expect(() => config({ SHUTDOWN_DRAIN_MS: '-1' })).toThrow(/SHUTDOWN_DRAIN_MS/);
    expect(() => config({ OTEL_EXPORTER_OTLP_ENDPOINT: 'not a url' })).toThrow(/OTEL_EXPORTER_OTLP_ENDPOINT is not a valid URL/);
    const parsed = config({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318/', SHUTDOWN_DRAIN_MS: '5000' });
    expect(parsed.telemetry.otlpEndpoint).toBe('http://collector:4318');
    expect(parsed.shutdown.drainMs).toBe(5000);
    expect(config({}).shutdown.drainMs).toBe(25_000);
  });
});
