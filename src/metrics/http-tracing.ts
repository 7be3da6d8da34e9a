import { context, defaultTextMapGetter, ROOT_CONTEXT, type Span, SpanKind, SpanStatusCode, type Tracer, trace } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { redactText } from '../audit/redact.js';

/**
 * A request's path as the access line and the HTTP span record it (no query). A caller key can
 * only land in a path segment the router did not fix: an unmatched path (a client whose base URL
 * has the key in it) or a route parameter (a key passed as a job id). Those are masked; a route
 * without parameters is its own path and is taken as it came, so the common request costs a scan
 * of its route pattern. The path, not the pattern, so an operator still sees which job or key id.
 */
export function recordedPath(request: FastifyRequest): string {
  const q = request.url.indexOf('?');
  const path = q === -1 ? request.url : request.url.slice(0, q);
  const route = request.routeOptions.url;
  return route === undefined || route.includes(':') || route.includes('*') ? redactText(path) : path;
}

/**
 * One SERVER span per HTTP request, continuing the caller's `traceparent`. Installed only when
 * tracing is configured (gateway.ts), so without OTEL_EXPORTER_OTLP_ENDPOINT these hooks do not
 * exist at all. Hooks, not an interceptor (PERFORMANCE.md).
 */
export function installHttpTracing(fastify: FastifyInstance, tracer: Tracer): void {
  const spans = new WeakMap<FastifyRequest, Span>();
  // This gateway's own propagator: nothing process-global to register or to conflict with.
  const propagator = new W3CTraceContextPropagator();

  fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    const parent = propagator.extract(ROOT_CONTEXT, request.headers, defaultTextMapGetter);
    const route = request.routeOptions.url ?? 'unmatched';
    const span = tracer.startSpan(
      `${request.method} ${route}`,
      {
        kind: SpanKind.SERVER,
        attributes: { 'http.request.method': request.method, 'http.route': route, 'url.path': recordedPath(request), 'gatehouse.request_id': request.id },
      },
      parent,
    );
    spans.set(request, span);
    // A caller that leaves after its body was read (gave up on a slow answer, closed a stream)
    // gets neither onResponse nor onRequestAbort: Node marks a request aborted only while its body
    // is incomplete. Ended here, as the HTTP metrics count it (499 when nothing was sent).
    reply.raw.once('close', () => {
      if (!reply.raw.writableFinished) endLeft(request, reply.raw.headersSent ? reply.statusCode : 499);
    });
    done();
  });

  const endLeft = (request: FastifyRequest, status: number): void => {
    const span = spans.get(request);
    if (span === undefined) return;
    span.setAttribute('http.response.status_code', status);
    span.setStatus({ code: SpanStatusCode.ERROR, message: 'client closed the connection' });
    span.end();
    spans.delete(request);
  };

  // The body is parsed between onRequest and preHandler, in the socket's async context; the span
  // is made active here so the handler and the pipeline (GatewayMetrics' spans) run inside it.
  fastify.addHook('preHandler', (request: FastifyRequest, _reply: FastifyReply, done: () => void) => {
    const span = spans.get(request);
    if (span === undefined) {
      done();
      return;
    }
    context.with(trace.setSpan(context.active(), span), done);
  });

  fastify.addHook('onResponse', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    const span = spans.get(request);
    if (span !== undefined) {
      span.setAttribute('http.response.status_code', reply.statusCode);
      if (reply.statusCode >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
      span.end();
      spans.delete(request);
    }
    done();
  });

  fastify.addHook('onRequestAbort', (request: FastifyRequest, done: () => void) => {
    endLeft(request, 499);
    done();
  });
}
