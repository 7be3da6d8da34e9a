import { Global, Module, type OnApplicationShutdown } from '@nestjs/common';
import { MetricService } from 'nestjs-otel';
import { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { GatewayMetrics } from './gateway-metrics.js';
import { MetricsAccess } from './metrics-access.js';
import { MetricsController } from './metrics.controller.js';
import { createTelemetry, Telemetry } from './telemetry.js';
import { WorkerOpsServer } from './worker-ops-server.js';

/**
 * Metrics and traces. nestjs-otel's `MetricService` creates the instruments; its
 * `OpenTelemetryModule.forRoot()` is deliberately not imported: since nestjs-otel 8 that module
 * applies its WideEventMiddleware to every route, measured here at +6.5 µs of server CPU per
 * request (+25 % on a bare Nest route), for a wide-event feature the gateway does not use.
 */
@Global()
@Module({
  controllers: [MetricsController],
  providers: [
    MetricService,
    {
      provide: Telemetry,
      // The process's SDK was started by createGateway before the app was built; the tracer is this app's.
      useFactory: (config: AppConfig, appLogger: AppLogger): Promise<Telemetry> =>
        createTelemetry({ role: config.role, otlpEndpoint: config.telemetry.otlpEndpoint, logger: appLogger.logger }),
      inject: [AppConfig, AppLogger],
    },
    GatewayMetrics,
    MetricsAccess,
    WorkerOpsServer,
  ],
  exports: [GatewayMetrics, Telemetry],
})
export class MetricsModule implements OnApplicationShutdown {
  constructor(private readonly telemetry: Telemetry) {}

  async onApplicationShutdown(): Promise<void> {
    await this.telemetry.shutdown();
  }
}
