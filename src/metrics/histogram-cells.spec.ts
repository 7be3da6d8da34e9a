import { PrometheusExporter, PrometheusSerializer } from '@opentelemetry/exporter-prometheus';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider } from '@opentelemetry/sdk-metrics';
import { describe, expect, it } from 'vitest';
import { MAX_SERIES, OVERFLOW } from './counter-cells.js';
import { HistogramCells, LocalMetrics } from './histogram-cells.js';

const BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const OPTIONS = {
  name: 'gatehouse_http_request_duration_seconds',
  description: 'HTTP requests by method, route pattern and status',
  unit: 's',
  boundaries: BOUNDARIES,
  labels: ['method', 'route', 'status'],
};

/** What GET /metrics would answer for one reader, as the gateway configures the exporter. */
async function scrape(exporter: PrometheusExporter): Promise<string> {
  const { resourceMetrics } = await exporter.collect();
  return new PrometheusSerializer(undefined, false, undefined, false, true).serialize(resourceMetrics);
}

function otelReader(): { exporter: PrometheusExporter; record(value: number, attributes: Record<string, string>): void } {
  const exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true });
  const provider = new MeterProvider({ resource: resourceFromAttributes({ 'service.name': 'gatehouse' }), readers: [exporter] });
  const histogram = provider.getMeter('nestjs-otel').createHistogram(OPTIONS.name, {
    description: OPTIONS.description,
    unit: OPTIONS.unit,
    advice: { explicitBucketBoundaries: BOUNDARIES },
  });
  return { exporter, record: (value, attributes) => histogram.record(value, attributes) };
}

function localReader(): { exporter: PrometheusExporter; cells: HistogramCells } {
  const local = new LocalMetrics();
  const cells = local.histogram(OPTIONS);
  const exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true, metricProducers: [local] });
  new MeterProvider({ resource: resourceFromAttributes({ 'service.name': 'gatehouse' }), readers: [exporter] });
  return { exporter, cells };
}

describe('HistogramCells', () => {
  it('scrapes to the text an OpenTelemetry histogram with the same samples scrapes to', async () => {
    const otel = otelReader();
    const local = localReader();
    // Boundaries themselves (a sample equal to a boundary counts in that bucket), values between,
    // above the largest, zero, and three label sets.
    const samples: Array<[number, string, string, string]> = [
      [0, 'POST', '/v1/chat/completions', '200'],
      [0.001, 'POST', '/v1/chat/completions', '200'],
      [0.0011, 'POST', '/v1/chat/completions', '200'],
      [0.0042, 'POST', '/v1/chat/completions', '200'],
      [2.5, 'POST', '/v1/chat/completions', '200'],
      [500, 'POST', '/v1/chat/completions', '200'],
      [0.2, 'POST', '/v1/chat/completions', '429'],
      [0.03, 'GET', '/v1/models', '200'],
      [0.03, 'GET', '/v1/models', '200'],
    ];
    for (const [value, method, route, status] of samples) {
      otel.record(value, { method, route, status });
      local.cells.record([method, route, status], value);
    }
    const expected = await scrape(otel.exporter);
    expect(expected).toContain('gatehouse_http_request_duration_seconds_bucket{method="POST",route="/v1/chat/completions",status="200",le="0.001"} 2');
    expect(await scrape(local.exporter)).toBe(expected);
  });

  it('leaves out what OpenTelemetry leaves out: negative and NaN samples, and a histogram with none', async () => {
    const otel = otelReader();
    const local = localReader();
    expect(await scrape(local.exporter)).toBe(await scrape(otel.exporter));
    local.cells.record(['GET', '/health/ready', '200'], -1);
    local.cells.record(['GET', '/health/ready', '200'], Number.NaN);
    expect(local.cells.countOf(['GET', '/health/ready', '200'])).toBe(0);
    expect(await scrape(local.exporter)).toBe(await scrape(otel.exporter));
  });

  it('folds label sets past MAX_SERIES into one overflow series', () => {
    const cells = new HistogramCells({ ...OPTIONS, labels: ['model'] });
    for (let i = 0; i < MAX_SERIES + 5; i++) cells.record([`model-${i}`], 0.1);
    expect(cells.countOf([`model-${MAX_SERIES - 1}`])).toBe(1);
    expect(cells.countOf([`model-${MAX_SERIES}`])).toBe(0);
    expect(cells.countOf([OVERFLOW])).toBe(5);
    const { dataPoints } = cells.collect([0, 0]);
    expect(dataPoints).toHaveLength(MAX_SERIES + 1);
    expect(dataPoints.at(-1)).toMatchObject({ attributes: { model: OVERFLOW }, value: { count: 5 } });
  });
});
