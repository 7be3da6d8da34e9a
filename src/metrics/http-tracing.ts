import { context, defaultTextMapGetter, ROOT_CONTEXT, type Span, SpanKind, SpanStatusCode, type Tracer, trace } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

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
        attributes: { 'http.request.method': request.method, 'http.route': route, 'url.path': request.url.split('?')[0], 'gatehouse.request_id': request.id },
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
