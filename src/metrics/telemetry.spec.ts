import { describe, expect, it } from 'vitest';
import { loadConfig } from '../config/config.js';
import { otlpTracesUrl } from './telemetry.js';

const tracesUrl = (endpoint: string): string => otlpTracesUrl(loadConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: endpoint }).telemetry.otlpEndpoint ?? '');

describe('where spans are sent (OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces)', () => {
  it('appends /v1/traces to the path of the base URL', () => {
    expect(tracesUrl('http://collector:4318')).toBe('http://collector:4318/v1/traces');
    expect(tracesUrl('http://collector:4318/')).toBe('http://collector:4318/v1/traces');
    expect(tracesUrl('https://collector.internal/otlp/')).toBe('https://collector.internal/otlp/v1/traces');
  });

  // Appended to the text, the path landed inside the query (…/otlp?tenant=a/v1/traces), so spans
  // went to /otlp and a collector routing tenants by query string got a wrong tenant too.
  it('keeps a query string as a query string, after the path', () => {
    expect(tracesUrl('https://collector.internal/otlp?tenant=a')).toBe('https://collector.internal/otlp/v1/traces?tenant=a');
    expect(tracesUrl('https://collector.internal/otlp/?tenant=a&region=eu')).toBe('https://collector.internal/otlp/v1/traces?tenant=a&region=eu');
  });
});
