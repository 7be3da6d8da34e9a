import 'reflect-metadata';
import type { IncomingMessage } from 'node:http';
import type { INestApplicationContext } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { FastifyAdapter, type NestFastifyApplication } from '@nestjs/platform-fastify';
import { DocumentBuilder, type OpenAPIObject, SwaggerModule } from '@nestjs/swagger';
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { AppModule, DATABASE_CONTENT } from './app.module.js';
import { AuditHttpHook } from './audit/audit-http.hook.js';
import { type AppConfig, describeConfig } from './config/config.js';
import type { Clock } from './core/clock.js';
import { GatewayError } from './core/errors.js';
import { OpenAiErrorFilter, sendError, toGatewayError } from './core/http-errors.js';
import { createLogger, PinoNestLogger, requestLineLogger } from './core/logger.js';
import { requestIdFor } from './core/request-id.js';
import { originForm } from './core/origin-form.js';
import { type DatabaseTarget, openDatabase } from './database/data-source.js';
import { IdentityBootstrapService } from './identity/identity-bootstrap.service.js';
import { ShutdownService } from './lifecycle/shutdown.service.js';
import { GatewayMetrics } from './metrics/gateway-metrics.js';
import { installHttpTracing, recordedPath } from './metrics/http-tracing.js';
import { startOpenTelemetry, Telemetry } from './metrics/telemetry.js';
import { UpstreamInfo } from './upstream/llm-client.js';

export interface GatewayOptions {
  logger?: Logger;
  clock?: Clock;
  /** Tests: open the embedded database from a prepared, migrated template instead of initdb. */
  databaseTarget?: DatabaseTarget;
  /** false: build the app without listening (tests that use inject). Default true. */
  listen?: boolean;
}

export interface Gateway {
  app: NestFastifyApplication;
  config: AppConfig;
  /** Base URL when listening, e.g. http://127.0.0.1:8080 */
  url: string;
  /** The admin key generated on this start, if one was (never logged). */
  generatedAdminKey: string | undefined;
  close(): Promise<void>;
}

/**
 * After a signal's shutdown the process ends through process.exit (status 0) rather than Nest's
 * default of raising the signal again: only an exit runs the 'exit' handlers that write out the
 * log lines still buffered (core/logger.ts), such as the shutdown's own "drained".
 */
const SHUTDOWN_HOOKS = { useProcessExit: true };
const LIVENESS_ROUTE = '/health/live';

/**
 * Builds and starts the HTTP gateway. Shared by main.ts and every e2e test, so tests run the
 * production wiring: the same module graph, hooks, filter and body limits.
 */
export async function createGateway(config: AppConfig, options: GatewayOptions = {}): Promise<Gateway> {
  const logger = options.logger ?? createLogger(config.logLevel);
  const started = performance.now();
  logger.info({ context: 'Gateway', config: describeConfig(config) }, 'starting');
  // OpenTelemetry before the app: the instruments the modules create bind to this SDK's meter.
  startOpenTelemetry(logger);
  const database = await openDatabase(options.databaseTarget ?? config.database, DATABASE_CONTENT);

  // Every line has a context (docs/operations.md "Logs"): an error answer's is Errors.
  const errorLogger = logger.child({ context: 'Errors' });
  // Known once the app is built; read by the pre-routing error handler, which runs without hooks.
  const marks: FrameworkErrorMarks = { mock: false, audit: undefined, answered: undefined };
  const adapter = new FastifyAdapter({
    bodyLimit: config.bodyLimitBytes,
    // Fastify takes a hop count too (its docs and proxy-addr); the adapter's type leaves it out.
    trustProxy: config.trustProxy as boolean | string[],
    logger: false,
    requestIdHeader: false,
    genReqId: requestIdFor,
    // Keep-alive longer than typical load balancer idle timeouts (60 s) to avoid reset races.
    keepAliveTimeout: 65_000,
    // Nest closes the server only after ShutdownService's drain, and the preClose hook below waits
    // for requests accepted since, so what is still connected then carries no request. Closed, not
    // waited on: a connection that has not sent a whole request (a load balancer's pre-opened one,
    // a client midway through its headers) is not idle to Node, and Fastify's default would wait
    // for it up to headersTimeout (60 s), past the pod's grace period, so the writers' last flush
    // would never run.
    forceCloseConnections: true,
    // A request arriving while the server closes is refused by the onRequest hook below, in the
    // OpenAI envelope and with its audit row and log line; Fastify's own 503 had none of them, and
    // refused liveness too.
    return503OnClosing: false,
    // Errors Fastify answers before routing (a URL it cannot decode, a path parameter over its
    // length limit) skip the hooks and the filter: rendered here as every other error is.
    frameworkErrors: (error: FastifyError, request: FastifyRequest, reply: FastifyReply) => frameworkError(error, request, reply, errorLogger, marks),
    // An absolute-form target (`POST http://host/admin/keys`) is read as its origin form everywhere.
    rewriteUrl: (raw: IncomingMessage) => originForm(raw.url ?? '/'),
  });
  let app: NestFastifyApplication;
  try {
    app = await NestFactory.create<NestFastifyApplication>(AppModule.forRoot({ config, logger, database, clock: options.clock }), adapter, {
      logger: new PinoNestLogger(logger),
      abortOnError: false,
      // Nest's parsers add application/x-www-form-urlencoded: every body here is JSON (API.md), and
      // a JSON body sent as a form (curl -d's default) was answered "missing 'messages'". Fastify's
      // own JSON parser stays; text/plain goes below. Anything else is 415 unsupported_media_type.
      bodyParser: false,
    });
  } catch (error) {
    await database.close();
    throw error;
  }
  app.useGlobalFilters(new OpenAiErrorFilter(errorLogger));
  app.enableShutdownHooks([], SHUTDOWN_HOOKS);

  const fastify = app.getHttpAdapter().getInstance();
  fastify.removeContentTypeParser('text/plain');
  const metrics = app.get(GatewayMetrics);
  const shutdown = app.get(ShutdownService);
  const access = requestLineLogger(logger, { context: 'Http' });
  const accessLine = (request: FastifyRequest, reply: FastifyReply, status: number): void =>
    access.info({ reqId: request.id, method: request.method, url: recordedPath(request), status, ms: Math.round(reply.elapsedTime), keyPrefix: request.principal?.keyPrefix }, 'request');
  // A response cut before it finished gets no onResponse: counted as the caller saw it (499
  // when nothing was sent, else the status its headers carried), and its access line written
  // here, unless a completion call owns it (the pipeline logs that one however it ends). One whose
  // caller left before the handler answered logs 499 (its audit row has the decided status) once
  // the handler answers (onSend below): only then is it known whether the pipeline took the call
  // (it was looking the key up, say) and logs it itself.
  const leftBeforeAnswer = new WeakSet<FastifyRequest>();
  shutdown.onUnfinished = (reply) => {
    const request = reply.request;
    const status = reply.raw.headersSent ? reply.statusCode : 499;
    metrics.httpResponse(request, reply, status);
    if (!access.isLevelEnabled('info')) return;
    if (!reply.raw.headersSent) leftBeforeAnswer.add(request);
    else if (request.completionCall === undefined) accessLine(request, reply, status);
  };
  const telemetry = app.get(Telemetry);
  // Hooks instead of interceptors: an rxjs chain per request costs more than Nest and Fastify
  // together (PERFORMANCE.md).
  // The built-in mock says so on every response (API.md), not only on completions: a job polled,
  // /v1/models, an error.
  marks.mock = app.get(UpstreamInfo).mock;
  marks.audit = app.get(AuditHttpHook);
  // One line per request: a call the completion pipeline took over has its own line (with the
  // status), so this one is only for the rest. The level check skips building the object at
  // LOG_LEVEL=warn and above (it runs on every response).
  const answered = (request: FastifyRequest, reply: FastifyReply): void => {
    if (request.completionCall?.audited !== true && access.isLevelEnabled('info')) accessLine(request, reply, reply.statusCode);
    metrics.httpResponse(request, reply);
  };
  // Answered without hooks (frameworkError): written as onResponse writes the rest.
  marks.answered = answered;
  // Set as the server starts closing (preClose): from then on the listener stays open only while
  // quiesce() waits for the requests accepted before, so new ones are refused (they carry
  // `connection: close`, as every answer since the drain began). Liveness still answers 200 until
  // the server has closed (docs/operations.md "Shutdown").
  let serverClosing = false;
  fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    void reply.header('x-request-id', request.id);
    if (marks.mock) void reply.header('x-gateway-upstream', 'mock');
    forgetTypeOfEmptyBody(request.headers);
    shutdown.track(reply);
    if (serverClosing && request.routeOptions.url !== LIVENESS_ROUTE) {
      sendError(reply, request, new GatewayError('unavailable', 'The gateway is shutting down; retry the request.'), errorLogger);
      return;
    }
    done();
  });
  // Runs as Nest closes the server, before forceCloseConnections closes every connection: a request
  // accepted after the drain went idle (while later shutdown hooks ran) is answered first.
  fastify.addHook('preClose', (done: () => void) => {
    serverClosing = true;
    void shutdown.quiesce().then(() => done());
  });
  fastify.addHook('onSend', (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void) => {
    if (leftBeforeAnswer.has(request) && request.completionCall?.audited !== true) accessLine(request, reply, 499);
    done(null, payload);
  });
  fastify.addHook('onResponse', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    answered(request, reply);
    done();
  });
  if (telemetry.tracer) installHttpTracing(fastify, telemetry.tracer);

  // A factory, not a document: Swagger builds it on the first /docs request instead of at every
  // start, and a process nobody asks for its docs never holds it (docs/operations.md "Memory").
  const document = (): OpenAPIObject =>
    SwaggerModule.createDocument(
      app,
      new DocumentBuilder()
        .setTitle('Gatehouse')
        .setDescription('OpenAI-compatible LLM gateway: routing, budgets, cache, rate limits. Contract: API.md.')
        .setVersion('0.1.0')
        .addBearerAuth()
        .build(),
    );
  SwaggerModule.setup('docs', app, document, { jsonDocumentUrl: 'docs/openapi.json' });

  const bootstrap = app.get(IdentityBootstrapService);
  let url = '';
  try {
    if (options.listen === false) {
      await app.init();
    } else {
      await app.listen(config.port, config.host);
      const address = app.getHttpServer().address();
      const port = typeof address === 'object' && address ? address.port : config.port;
      url = `http://127.0.0.1:${port}`;
    }
  } catch (error) {
    // The app initialised (and on a fresh embedded database stored a generated admin key) before
    // listen failed: that key was never shown, and left active it would stop the next start from
    // generating one it does show.
    await bootstrap.withdrawGeneratedKey().catch((withdrawError: unknown) =>
      logger.error({ context: 'Gateway', err: withdrawError }, 'could not revoke the admin key generated by this failed start'),
    );
    await app.close();
    throw error;
  }
  bootstrap.announceGeneratedKey();
  const generatedAdminKey = bootstrap.generatedAdminKey;
  logger.info({ context: 'Gateway', url, ms: Math.round(performance.now() - started) }, 'ready');
  return {
    app,
    config,
    url,
    generatedAdminKey,
    close: async () => {
      await app.close();
    },
  };
}

interface FrameworkErrorMarks {
  mock: boolean;
  audit: AuditHttpHook | undefined;
  answered: ((request: FastifyRequest, reply: FastifyReply) => void) | undefined;
}

/**
 * Fastify's pre-routing errors in the OpenAI envelope, with the request id every response carries
 * (the onRequest hook that sets it does not run for them), and their audit row (nor does the audit
 * hook). The path is not echoed: it is what could not be read.
 */
function frameworkError(error: FastifyError, request: FastifyRequest, reply: FastifyReply, logger: Logger, marks: FrameworkErrorMarks): void {
  void reply.header('x-request-id', request.id);
  if (marks.mock) void reply.header('x-gateway-upstream', 'mock');
  const known = toGatewayError(
    error.code === 'FST_ERR_BAD_URL'
      ? new GatewayError('invalid_value', 'The request URL is not valid: it has a malformed percent-encoding or is not a valid URL component.', {
          cause: error,
        })
      : error.code === 'FST_ERR_MAX_PARAM_LENGTH'
        ? new GatewayError('invalid_value', 'A path parameter of the request URL is longer than this gateway accepts.', { cause: error })
        : error,
  );
  marks.audit?.recordUnrouted(request, known);
  sendError(reply, request, known, logger);
  marks.answered?.(request, reply);
}

export interface WorkerProcess {
  app: INestApplicationContext;
  config: AppConfig;
  close(): Promise<void>;
}

/**
 * GATEHOUSE_ROLE=worker: the same module graph with no HTTP server at all; it only processes the
 * shared (BullMQ) job queue, so workers scale apart from API instances. Shared by main.ts and tests.
 */
export async function createWorker(config: AppConfig, options: Omit<GatewayOptions, 'listen'> = {}): Promise<WorkerProcess> {
  const logger = options.logger ?? createLogger(config.logLevel);
  const started = performance.now();
  logger.info({ context: 'Worker', config: describeConfig(config) }, 'starting');
  startOpenTelemetry(logger);
  const database = await openDatabase(options.databaseTarget ?? config.database, DATABASE_CONTENT);
  let app: INestApplicationContext;
  try {
    app = await NestFactory.createApplicationContext(AppModule.forRoot({ config, logger, database, clock: options.clock }), {
      logger: new PinoNestLogger(logger),
      abortOnError: false,
    });
  } catch (error) {
    await database.close();
    throw error;
  }
  app.enableShutdownHooks([], SHUTDOWN_HOOKS);
  logger.info({ context: 'Worker', ms: Math.round(performance.now() - started) }, 'ready: processing jobs (no HTTP server)');
  return { app, config, close: () => app.close() };
}

/**
 * A request with an empty body has nothing to parse, whatever type it names: `fetch`
 * sends `text/plain;charset=UTF-8` with `body: ''` and `curl -d ''` a form type, and since only
 * JSON is parsed (415 for the rest) a DELETE or a retry without a body was refused for its
 * header. Its type is dropped unless it is JSON (an empty JSON body stays the parser's 400; the
 * rollback route forgives that one itself). One header read for every other request.
 */
function forgetTypeOfEmptyBody(headers: FastifyRequest['headers']): void {
  // No content-length and no transfer-encoding is no body at all (RFC 9112 6.3); fetch sends a
  // DELETE's empty body that way.
  const length = headers['content-length'];
  if ((length !== '0' && length !== undefined) || headers['transfer-encoding'] !== undefined) return;
  const type = headers['content-type'];
  if (type !== undefined && !type.trimStart().toLowerCase().startsWith('application/json')) delete headers['content-type'];
}
