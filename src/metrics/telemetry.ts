import { type DiagLogger, DiagLogLevel, diag, type Tracer } from '@opentelemetry/api';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { type Resource, resourceFromAttributes } from '@opentelemetry/resources';
import { NodeSDK } from '@opentelemetry/sdk-node';
import { BatchSpanProcessor, TracerProvider } from '@opentelemetry/sdk-trace';
import type { Logger } from 'pino';

/**
 * One gateway's telemetry: the process's Prometheus exporter (GET /metrics asks it; it never opens
 * a port of its own) and, only when OTEL_EXPORTER_OTLP_ENDPOINT is set, a tracer whose spans a
 * batching OTLP/HTTP exporter sends. Without an endpoint no tracer exists and no span is made.
 */
export abstract class Telemetry {
  declare readonly exporter: PrometheusExporter;
  /** undefined when tracing is off: callers test it once and skip all span work. */
  declare readonly tracer: Tracer | undefined;
  /** Sends the spans still buffered and stops this gateway's tracer (on shutdown). */
  abstract shutdown(): Promise<void>;
}

interface ProcessTelemetry {
  readonly exporter: PrometheusExporter;
}

// The OpenTelemetry API keeps the meter provider in a process global and accepts it only once, so
// the SDK is started once per process and kept here, where a re-evaluated module graph (a test
// runner reusing a worker) finds it too. Several gateways in one process share the metrics.
const SLOT = Symbol.for('gatehouse.telemetry');
type Slot = { [SLOT]?: ProcessTelemetry };

/**
 * Starts the OpenTelemetry SDK for the process, before the Nest app is built (idempotent): a
 * MeterProvider read by the Prometheus exporter, and the AsyncLocalStorage context manager spans
 * use to find their parent. No auto-instrumentation: patching http/undici/pg costs on every call
 * (PERFORMANCE.md); the spans worth having are made by hand (GatewayMetrics, http-tracing.ts).
 */
export function startOpenTelemetry(logger: Logger): ProcessTelemetry {
  const holder = globalThis as Slot;
  const existing = holder[SLOT];
  if (existing) return existing;
  diag.setLogger(diagToPino(logger), DiagLogLevel.WARN);
  const exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true });
  const sdk = new NodeSDK({
    // Detectors read the environment and the host at start; the attribute worth having is set here.
    autoDetectResources: false,
    resource: gatehouseResource(),
    metricReaders: [exporter],
    // Empty lists mean "no provider": tracing is per gateway (createTracing), logs go to pino.
    spanProcessors: [],
    logRecordProcessors: [],
    instrumentations: [],
    textMapPropagator: null,
  });
  sdk.start();
  const created: ProcessTelemetry = { exporter };
  holder[SLOT] = created;
  return created;
}

/** This gateway's telemetry; its tracer (if any) belongs to it and stops with it. */
export function createTelemetry(options: { logger: Logger; otlpEndpoint: string | undefined; role: string }): Telemetry {
  const { exporter } = startOpenTelemetry(options.logger);
  const provider = options.otlpEndpoint
    ? new TracerProvider({
        resource: gatehouseResource().merge(resourceFromAttributes({ 'gatehouse.role': options.role })),
        spanProcessors: [new BatchSpanProcessor({ exporter: new OTLPTraceExporter({ url: `${options.otlpEndpoint}/v1/traces` }) })],
      })
    : undefined;
  return {
    exporter,
    tracer: provider?.getTracer('gatehouse'),
    shutdown: async () => {
      await provider?.shutdown();
    },
  };
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
