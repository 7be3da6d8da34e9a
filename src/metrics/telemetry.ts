import { context, DiagConsoleLogger, type DiagLogger, DiagLogLevel, diag, metrics, type Tracer } from '@opentelemetry/api';
import { diagLogLevelFromString, getBooleanFromEnv, getStringFromEnv } from '@opentelemetry/core';
import { PrometheusExporter, PrometheusSerializer } from '@opentelemetry/exporter-prometheus';
import { type Resource, resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider } from '@opentelemetry/sdk-metrics';
import type { TracerProvider } from '@opentelemetry/sdk-trace';
import type { Logger } from 'pino';
import { GatewayError } from '../core/errors.js';
import { localMetrics } from './histogram-cells.js';

/** What GET /metrics answers, on the API's route and the worker's ops server alike. */
export interface MetricsAnswer {
  readonly status: number;
  readonly contentType: string;
  readonly body: string;
}

/**
 * One gateway's telemetry: the process's Prometheus exporter (GET /metrics asks it; it never opens
 * a port of its own) and, only when OTEL_EXPORTER_OTLP_ENDPOINT is set, a tracer whose spans a
 * batching OTLP/HTTP exporter sends. Without an endpoint no tracer exists and no span is made.
 */
export abstract class Telemetry {
  declare readonly exporter: PrometheusExporter;
  /** undefined when tracing is off: callers test it once and skip all span work. */
  declare readonly tracer: Tracer | undefined;
  /** The scrape: Prometheus text, or a 503 in the OpenAI envelope when it cannot be made; never rejects. */
  declare readonly scrape: () => Promise<MetricsAnswer>;
  /** Sends the spans still buffered and stops this gateway's tracer (on shutdown). */
  abstract shutdown(): Promise<void>;
}

interface ProcessTelemetry {
  readonly exporter: PrometheusExporter;
  readonly scrape: () => Promise<MetricsAnswer>;
  /** Whether the AsyncLocalStorage context manager is registered (with the first tracer). */
  contextManager: boolean;
}

// The OpenTelemetry API keeps the meter provider in a process global and accepts it only once, so
// the SDK is started once per process and kept here, where a re-evaluated module graph (a test
// runner reusing a worker) finds it too. Several gateways in one process share the metrics.
const SLOT = Symbol.for('gatehouse.telemetry');
type Slot = { [SLOT]?: ProcessTelemetry };

/**
 * Starts OpenTelemetry metrics for the process, before the Nest app is built (idempotent): a
 * MeterProvider read by the Prometheus exporter. No auto-instrumentation: patching
 * http/undici/pg costs on every call (PERFORMANCE.md); the spans worth having are made by hand
 * (GatewayMetrics, http-tracing.ts).
 *
 * The SDK's MeterProvider directly, not `NodeSDK`: NodeSDK imports every exporter it could be
 * configured with (OTLP over gRPC, protobuf and HTTP for traces, metrics and logs, Zipkin, the
 * declarative-config parser), ~5 MB of heap kept for the process's life to run metrics only
 * (docs/operations.md "Memory"). What tracing needs is imported when an endpoint is configured.
 */
export function startOpenTelemetry(logger: Logger): ProcessTelemetry {
  const holder = globalThis as Slot;
  const existing = holder[SLOT];
  if (existing) return existing;
  diag.setLogger(diagToPino(logger), DiagLogLevel.WARN);
  // The two standard variables NodeSDK honoured, kept with the same meaning.
  const logLevel = getStringFromEnv('OTEL_LOG_LEVEL');
  if (logLevel !== undefined) diag.setLogger(new DiagConsoleLogger(), { logLevel: diagLogLevelFromString(logLevel) });
  // The latency histograms are the gateway's own (histogram-cells.ts), reported alongside the SDK's.
  const exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true, metricProducers: [localMetrics()] });
  const disabled = getBooleanFromEnv('OTEL_SDK_DISABLED');
  if (!disabled) metrics.setGlobalMeterProvider(new MeterProvider({ resource: gatehouseResource(), readers: [exporter] }));
  const created: ProcessTelemetry = { exporter, scrape: scraper(exporter, disabled, logger), contextManager: false };
  holder[SLOT] = created;
  return created;
}

/**
 * Collects and serialises as the exporter's own request handler does, except on failure: that
 * handler answers a failed collection (an exporter bound to no MeterProvider: OTEL_SDK_DISABLED)
 * with a 200 and a comment line, which Prometheus takes for a healthy target with no series. A
 * 503 marks the target down instead. Logged once: every scrape after would only repeat it.
 */
function scraper(exporter: PrometheusExporter, disabled: boolean, logger: Logger): () => Promise<MetricsAnswer> {
  // The exporter's options above: no prefix, no timestamps, target_info kept, no scope info.
  const serializer = new PrometheusSerializer(undefined, false, undefined, false, true);
  let logged = false;
  return async () => {
    try {
      const { resourceMetrics, errors } = await exporter.collect();
      if (errors.length > 0) diag.error('PrometheusExporter: metrics collection errors', ...errors);
      return { status: 200, contentType: 'text/plain', body: serializer.serialize(resourceMetrics) };
    } catch (error) {
      const message = disabled ? 'Metrics are off: OTEL_SDK_DISABLED is set.' : 'Metrics could not be collected.';
      if (!logged) {
        logged = true;
        const line = { context: 'Metrics', err: error instanceof Error ? error.message : String(error) };
        // Set on purpose, it is a warning; any other failure is a fault.
        if (disabled) logger.warn(line, `GET /metrics answers 503: ${message}`);
        else logger.error(line, `GET /metrics answers 503: ${message}`);
      }
      const refusal = new GatewayError('unavailable', message);
      return { status: refusal.status, contentType: 'application/json; charset=utf-8', body: JSON.stringify(refusal.toEnvelope()) };
    }
  };
}

/** This gateway's telemetry; its tracer (if any) belongs to it and stops with it. */
export async function createTelemetry(options: { logger: Logger; otlpEndpoint: string | undefined; role: string }): Promise<Telemetry> {
  const shared = startOpenTelemetry(options.logger);
  const provider = options.otlpEndpoint ? await createTracerProvider(shared, options.otlpEndpoint, options.role) : undefined;
  return {
    exporter: shared.exporter,
    tracer: provider?.getTracer('gatehouse'),
    scrape: shared.scrape,
    shutdown: async () => {
      await provider?.shutdown();
    },
  };
}

async function createTracerProvider(shared: ProcessTelemetry, otlpEndpoint: string, role: string): Promise<TracerProvider> {
  const [{ AsyncLocalStorageContextManager }, { BatchSpanProcessor, TracerProvider }, { OTLPTraceExporter }] = await Promise.all([
    import('@opentelemetry/context-async-hooks'),
    import('@opentelemetry/sdk-trace'),
    import('@opentelemetry/exporter-trace-otlp-http'),
  ]);
  // Spans find their parent through the active context (http-tracing's preHandler makes the request
  // span active); the API accepts one context manager per process, registered by the first tracer.
  if (!shared.contextManager) {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    shared.contextManager = true;
  }
  return new TracerProvider({
    resource: gatehouseResource().merge(resourceFromAttributes({ 'gatehouse.role': role })),
    spanProcessors: [new BatchSpanProcessor({ exporter: new OTLPTraceExporter({ url: otlpTracesUrl(otlpEndpoint) }) })],
  });
}

/**
 * The endpoint's path with /v1/traces appended, its query string kept after it: appended to the
 * text instead, `https://c/otlp?tenant=a` sent spans to /otlp with the query `tenant=a/v1/traces`.
 */
export function otlpTracesUrl(otlpEndpoint: string): string {
  const url = new URL(otlpEndpoint);
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/v1/traces`;
  return url.toString();
}

function gatehouseResource(): Resource {
  return resourceFromAttributes({ 'service.name': 'gatehouse' });
}

/**
 * The SDK's own warnings (an unreachable collector, …) go to the JSON log. Only messages and error
 * messages are kept: the SDK's extra arguments can carry exporter settings (URL, headers).
 */
function diagToPino(logger: Logger): DiagLogger {
  const log = logger.child({ context: 'OpenTelemetry' });
  const text = (message: string, args: unknown[]): string => [message, ...args.flatMap((a) => (a instanceof Error ? [redactUrls(a.message)] : []))].join(' ');
  const noop = (): void => undefined;
  return {
    error: (message, ...args) => log.error(redactUrls(text(message, args))),
    warn: (message, ...args) => log.warn(redactUrls(text(message, args))),
    info: noop,
    debug: noop,
    verbose: noop,
  };
}

/** A collector URL may carry credentials (OTEL_EXPORTER_OTLP_ENDPOINT is flagged sensitive). */
function redactUrls(message: string): string {
  return message.replace(/\b[a-z][a-z0-9+.-]*:\/\/[^\s'"]+/gi, '[url]');
}
