import { writeSync } from 'node:fs';
import type { LoggerService } from '@nestjs/common';
import { pino, type Logger } from 'pino';
import { isoTime } from './iso-time.js';

/**
 * Structured JSON logs (pino). Secrets are redacted by path as a second line of defence; the
 * first is that no code path hands a key, an Authorization header or an upstream key to the
 * logger at all (config is logged through describeConfig, errors through their message only).
 */
const EXACT_PATHS = [
  'authorization',
  'apiKey',
  'key',
  'headers.authorization',
  'headers["x-api-key"]',
  'req.headers.authorization',
  'req.headers["x-api-key"]',
];

/**
 * One level down, under any key. These are what redaction costs: with them a line took about
 * twice the CPU of the same line without (13 µs more for a request's two lines on this VM;
 * BENCHMARKS.md, session 16), while the exact paths cost nothing measurable.
 */
const WILDCARD_PATHS = ['*.authorization', '*.apiKey', '*.api_key', '*.key', '*.password'];

export const REDACT_PATHS = [...EXACT_PATHS, ...WILDCARD_PATHS];

/** Lines are handed to stdout once this many characters are waiting… */
const LOG_BUFFER_CHARS = 16 * 1024;
/** …or at the latest this long after the first of them was logged. */
const LOG_FLUSH_MS = 200;
const STDOUT = 1;

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'gatehouse' },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      // pino's isoTime, without a Date per line (iso-time.ts).
      timestamp: () => `,"time":"${isoTime(Date.now())}"`,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination ?? bufferedStdout(),
  );
}

/**
 * stdout, written in batches (batchedDestination). Handed to pino's async destination line by
 * line, every request's lines took a write on libuv's thread pool of their own: at one connection
 * a cache hit at LOG_LEVEL=info cost 1.9× the CPU of the same hit at warn (BENCHMARKS.md,
 * session 16). On exit (a graceful shutdown ends in process.exit for this, or a crash that reaches
 * process exit) what still waits is written synchronously, after what pino's destination holds;
 * a SIGKILL (an OOM kill, say) loses at most LOG_FLUSH_MS of lines.
 */
function bufferedStdout(): pino.DestinationStream {
  const out = pino.destination({ dest: STDOUT, sync: false });
  const batched = batchedDestination(out);
  atExit(batched, () => {
    const rest = batched.take();
    if (rest.length === 0) return;
    try {
      out.flushSync();
      writeSync(STDOUT, rest);
    } catch {
      // stdout is gone (EPIPE): nobody is left to read the lines.
    }
  });
  return batched;
}

/**
 * What each live destination writes at exit, run by one 'exit' listener. A listener per logger
 * made Node warn (MaxListenersExceededWarning) in processes that create many, as the tests do,
 * and kept every logger alive. Weak: a destination no longer used is not kept for its exit write
 * (a WeakMap's value lives only as long as its key, even though it refers to it).
 */
const exitWrites = new WeakMap<object, () => void>();
const exitDestinations = new Set<WeakRef<object>>();

function atExit(destination: object, write: () => void): void {
  if (exitDestinations.size === 0) process.once('exit', writeAllAtExit);
  exitWrites.set(destination, write);
  exitDestinations.add(new WeakRef(destination));
}

function writeAllAtExit(): void {
  for (const ref of exitDestinations) {
    const destination = ref.deref();
    if (destination) exitWrites.get(destination)?.();
  }
  exitDestinations.clear();
}

export interface BatchedDestination extends pino.DestinationStream {
  /** Hands what waits to `out` now. */
  flush(cb?: () => void): void;
  /** What waits, taken out of the batch (for a synchronous write at exit). */
  take(): string;
}

/**
 * Lines wait until `maxChars` of them are buffered or `flushMs` passed since the first of them,
 * then go to `out` in one write. The timer is armed by a waiting line, so nothing runs while idle.
 */
export function batchedDestination(out: pino.DestinationStream, flushMs = LOG_FLUSH_MS, maxChars = LOG_BUFFER_CHARS): BatchedDestination {
  let waiting = '';
  let timer: NodeJS.Timeout | undefined;
  const take = (): string => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    const batch = waiting;
    waiting = '';
    return batch;
  };
  const flush = (): void => {
    const batch = take();
    if (batch.length > 0) out.write(batch);
  };
  return {
    write(line: string): void {
      waiting += line;
      if (waiting.length >= maxChars) flush();
      else timer ??= setTimeout(flush, flushMs).unref();
    },
    flush(cb?: () => void): void {
      flush();
      cb?.();
    },
    take,
  };
}

/**
 * For the lines every request writes (the access line, the completion line): a child that keeps
 * the exact paths but not the wildcard ones. Their fields are ids, key prefixes, models, counts
 * and timings that the gateway picks itself, never a caller's object, so the wildcards had
 * nothing to find there; test/e2e/logs.e2e-spec.ts checks that no key reaches the log.
 */
export function requestLineLogger(logger: Logger, bindings: Record<string, unknown> = {}): Logger {
  return logger.child(bindings, { redact: { paths: EXACT_PATHS, censor: '[redacted]' } });
}

/** Lets Nest's own messages (module init, route map) flow into the same JSON log. */
export class PinoNestLogger implements LoggerService {
  constructor(private readonly logger: Logger) {}

  log(message: unknown, context?: string): void {
    this.logger.info({ context }, String(message));
  }
  error(message: unknown, trace?: string, context?: string): void {
    this.logger.error({ context, trace }, String(message));
  }
  warn(message: unknown, context?: string): void {
    this.logger.warn({ context }, String(message));
  }
  debug(message: unknown, context?: string): void {
    this.logger.debug({ context }, String(message));
  }
  verbose(message: unknown, context?: string): void {
    this.logger.trace({ context }, String(message));
  }
}

/** DI token for the root pino logger; feature code asks for `AppLogger` and calls `.child()`. */
export abstract class AppLogger {
  declare readonly logger: Logger;
}
