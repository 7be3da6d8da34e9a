import { Writable } from 'node:stream';
import { BadRequestException, HttpException } from '@nestjs/common';
import { errorCodes, type FastifyReply, type FastifyRequest } from 'fastify';
import { describe, expect, it } from 'vitest';
import { GatewayError } from './errors.js';
import { databaseUnreachable, sendError, toGatewayError } from './http-errors.js';
import { LogThrottle } from './log-throttle.js';
import { createLogger } from './logger.js';

function capture() {
  const lines: Array<{ level: string; msg: string; sameSinceLastLine?: number; err?: { stack?: string } }> = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString()) as (typeof lines)[number]);
      done();
    },
  });
  return { logger: createLogger('info', sink), lines };
}

function fakeReply(): { reply: FastifyReply; sent: Array<{ status: number; body: unknown }> } {
  const sent: Array<{ status: number; body: unknown }> = [];
  let status = 0;
  const reply = {
    sent: false,
    raw: { headersSent: false },
    headers: () => reply,
    header: () => reply,
    status: (s: number) => ((status = s), reply),
    send: (body: unknown) => (sent.push({ status, body }), reply),
  } as unknown as FastifyReply;
  return { reply, sent };
}

const request = { id: 'req-1' } as FastifyRequest;

describe('sendError logging', () => {
  it('logs a dependency outage once per interval with a count, not once per request; every request still gets its answer', () => {
    const { logger, lines } = capture();
    let now = 0;
    const throttle = new LogThrottle(10_000, () => now);
    const { reply, sent } = fakeReply();
    const down = () => new GatewayError('unavailable', 'Budgets cannot be checked right now.', { cause: new Error('connect ECONNREFUSED') });
    for (let i = 0; i < 1000; i++) sendError(reply, request, down(), logger, throttle);
    now = 10_000;
    sendError(reply, request, down(), logger, throttle);
    expect(sent).toHaveLength(1001);
    expect(sent.every((s) => s.status === 503)).toBe(true);
    expect(lines.map((l) => [l.level, l.sameSinceLastLine])).toEqual([
      ['warn', 0],
      ['warn', 999],
    ]);
  });

  it('logs every internal error in full, with its stack', () => {
    const { logger, lines } = capture();
    const throttle = new LogThrottle(10_000, () => 0);
    const { reply } = fakeReply();
    for (let i = 0; i < 3; i++) sendError(reply, request, new Error('bug'), logger, throttle);
    expect(lines).toHaveLength(3);
    expect(lines.every((l) => l.level === 'error' && typeof l.err?.stack === 'string')).toBe(true);
  });
});

describe("toGatewayError for Fastify's body errors, as Nest hands them over", () => {
  // Nest's FastifyAdapter.mapException: the Fastify error becomes the HttpException's cause.
  const wrapped = (error: Error & { statusCode?: number }) => new HttpException(error.message, error.statusCode ?? 500, { cause: error });

  it('answers an empty JSON body as any unparseable one, 400 invalid_json; other 400s stay invalid_value in their own words', () => {
    for (const error of [new errorCodes.FST_ERR_CTP_EMPTY_JSON_BODY(), new errorCodes.FST_ERR_CTP_INVALID_JSON_BODY()]) {
      expect(toGatewayError(wrapped(error))).toMatchObject({ status: 400, code: 'invalid_json', message: 'Request body is not valid JSON.' });
    }
    const length = new errorCodes.FST_ERR_CTP_INVALID_CONTENT_LENGTH();
    expect(toGatewayError(wrapped(length))).toMatchObject({ status: 400, code: 'invalid_value', message: length.message });
    expect(toGatewayError(new BadRequestException('not JSON-shaped enough'))).toMatchObject({ status: 400, code: 'invalid_value' });
  });
});

describe('toGatewayError for a database out of reach', () => {
  it('answers 503 unavailable for connection failures, however they are wrapped, and keeps a wrong statement a 500', () => {
    const refused = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' });
    const wrapped = Object.assign(new Error('Connection terminated unexpectedly'), { driverError: new Error('Connection terminated unexpectedly') });
    const shuttingDown = Object.assign(new Error('terminating connection due to administrator command'), { code: '57P01' });
    const typeormWrapped = Object.assign(new Error('query failed'), { driverError: Object.assign(new Error('x'), { code: '08006' }) });
    for (const error of [refused, wrapped, shuttingDown, typeormWrapped, new Error('Query read timeout')]) {
      expect(databaseUnreachable(error)).toBe(true);
      expect(toGatewayError(error)).toMatchObject({ status: 503, code: 'unavailable' });
    }
    const syntax = Object.assign(new Error('syntax error at or near "SELEC"'), { code: '42601' });
    expect(databaseUnreachable(syntax)).toBe(false);
    expect(toGatewayError(syntax)).toMatchObject({ status: 500, code: 'internal_error' });
    expect(toGatewayError(new Error('boom'))).toMatchObject({ status: 500 });
  });
});

describe('toGatewayError for a value the database refuses (SQLSTATE class 22)', () => {
  it('answers 400 invalid_value, however it is wrapped, and leaves other statement errors a 500', () => {
    const outOfRange = Object.assign(new Error('value "3000000000" is out of range for type integer'), { code: '22003', severity: 'ERROR' });
    const typeormWrapped = Object.assign(new Error('query failed'), {
      driverError: Object.assign(new Error('date/time field value out of range: "0000-01-01T00:00:00.000Z"'), { code: '22008' }),
    });
    const badText = Object.assign(new Error('invalid input syntax for type uuid: "x"'), { code: '22P02' });
    for (const error of [outOfRange, typeormWrapped, badText]) {
      expect(toGatewayError(error)).toMatchObject({ status: 400, code: 'invalid_value', param: null });
    }
    for (const code of ['23505', '42703', '2200', '220030', 'ERR_22003']) {
      expect(toGatewayError(Object.assign(new Error('x'), { code }))).toMatchObject({ status: 500, code: 'internal_error' });
    }
  });
});

describe('sendError for a value the database refused', () => {
  it('answers 400 and says so in the log (throttled), since the edge validation missed it', () => {
    const { logger, lines } = capture();
    const throttle = new LogThrottle(10_000, () => 0);
    const { reply, sent } = fakeReply();
    const refused = () => Object.assign(new Error('value "3000000000" is out of range for type integer'), { code: '22003' });
    for (let i = 0; i < 3; i++) sendError(reply, request, refused(), logger, throttle);
    sendError(reply, request, new GatewayError('invalid_value', 'edge validation'), logger, throttle);
    expect(sent.map((s) => s.status)).toEqual([400, 400, 400, 400]);
    expect(lines.map((l) => [l.level, l.msg])).toEqual([['warn', 'a query refused a value: answered 400 invalid_value']]);
  });
});
