import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { Injectable, type OnApplicationBootstrap, type OnApplicationShutdown } from '@nestjs/common';
import type { Logger } from 'pino';
import { errorEnvelope } from '../../libs/openai-contract/src/index.js';
import { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { MetricsAccess } from './metrics-access.js';
import { Telemetry } from './telemetry.js';

/**
 * GATEHOUSE_ROLE=worker runs no API server, yet Prometheus and the kubelet need somewhere to ask.
 * This bare `node:http` listener on PORT answers only `GET /metrics` (same exporter, same
 * METRICS_TOKEN rule as the API) and `GET /health/live` (the event loop answers). A worker sits
 * behind no Service, so it has no readiness to report. api and all roles never start it.
 */
@Injectable()
export class WorkerOpsServer implements OnApplicationBootstrap, OnApplicationShutdown {
  private readonly logger: Logger;
  private server: Server | undefined;

  constructor(
    private readonly config: AppConfig,
    private readonly telemetry: Telemetry,
    private readonly access: MetricsAccess,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'WorkerOps' });
  }

  async onApplicationBootstrap(): Promise<void> {
    if (this.config.role !== 'worker') return;
    const server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.config.port, this.config.host, () => resolve());
    });
    this.server = server;
    const address = server.address();
    this.logger.info({ port: typeof address === 'object' && address ? address.port : this.config.port }, 'worker: /metrics and /health/live listening');
  }

  /** The bound port (tests listen on 0). */
  get port(): number | undefined {
    const address = this.server?.address();
    return typeof address === 'object' && address ? address.port : undefined;
  }

  async onApplicationShutdown(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'GET' && path === '/health/live') {
      json(res, 200, { status: 'ok', info: {}, error: {}, details: {} });
      return;
    }
    if (req.method === 'GET' && path === '/metrics') {
      if (!this.access.allows(req.headers.authorization)) {
        json(res, 401, errorEnvelope(MetricsAccess.REFUSAL, 'authentication_error', 'invalid_api_key'));
        return;
      }
      void this.telemetry.scrape().then((answer) => {
        res.writeHead(answer.status, { 'content-type': answer.contentType, 'cache-control': 'no-store' }).end(answer.body);
      });
      return;
    }
    json(res, 404, errorEnvelope('A worker answers only GET /metrics and GET /health/live.', 'not_found_error', 'not_found'));
  }
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8' }).end(JSON.stringify(body));
}
