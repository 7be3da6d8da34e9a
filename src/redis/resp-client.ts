import { EventEmitter } from 'node:events';
import { isIP, connect as netConnect, type Socket } from 'node:net';
import { type ConnectionOptions, connect as tlsConnect } from 'node:tls';
import { encodeCommand, RedisReplyError, type RespReply, RespReader } from './resp-parser.js';

/**
 * What the Redis drivers (cache, rate limit, their Lua scripts) need of a connection: whether it
 * can take commands now, and a way to send one. They depend on this, not on RespClient.
 */
export interface RedisCommands {
  /** `'ready'` when commands are accepted; anything else and `call` fails at once. */
  readonly status: string;
  call(command: string, ...args: Array<string | number>): Promise<unknown>;
  /**
   * True while `fire` sends without a reply: the server honoured CLIENT REPLY SKIP when this
   * connection was opened (a proxy in front of Redis may not).
   */
  readonly skipsReplies?: boolean;
  /**
   * Sends a command whose outcome nobody waits for, preceded by CLIENT REPLY SKIP: no reply to
   * parse, and no wakeup for it. Only while `skipsReplies`; throws when the connection is down.
   * Errors are never seen, so only commands that cannot fail for a reason worth knowing belong
   * here (a cache fill; not EVALSHA, which a SCRIPT FLUSH would fail unseen).
   */
  fire?(command: string, ...args: Array<string | number>): void;
}

/** What the probe echoes after a skipped ECHO: the only reply a server that honours SKIP sends. */
const SKIP_PROBE = 'gatehouse:reply-skip-probe';
/** Tells Redis not to answer the command after it; encoded once, it precedes every fired command. */
const SKIP_NEXT_REPLY = encodeCommand(['CLIENT', 'REPLY', 'SKIP']);

export interface RespClientOptions {
  /** CLIENT SETNAME, to tell the gateway's connections apart in `CLIENT LIST`. */
  name: string;
  /** Connecting, authenticating and selecting the database must finish within this. */
  connectTimeoutMs: number;
  /** A command not answered within this (±25%) takes its connection down with it. */
  commandTimeoutMs: number;
  /** Wait before reconnect attempt `times` (1, 2, …). */
  retryDelayMs(times: number): number;
  /**
   * Extra TLS options for `rediss://`. The gateway passes none: the server's certificate is checked
   * against the system's CAs and `NODE_EXTRA_CA_CERTS`, as ioredis did. Tests pass their own CA.
   */
  tls?: ConnectionOptions;
  /**
   * Makes this a subscriber connection: SUBSCRIBE `channel` is part of every (re)connect's
   * handshake, and each message published there goes to `onMessage`. Such a connection takes no
   * other commands (Redis allows almost none in subscribed state).
   */
  subscribe?: { channel: string; onMessage(payload: string): void };
}

export type RespStatus = 'connecting' | 'ready' | 'reconnecting' | 'end';

interface Pending {
  resolve(reply: unknown): void;
  reject(error: Error): void;
  sentAt: number;
}

/**
 * The gateway's own Redis command connection, for the commands on every request's path (the
 * rate-limit script, the cache lookup and fill). ioredis spends ~10 µs of CPU per command on
 * objects, a per-command timer and a per-tick pipeline; this client writes RESP straight to the
 * socket and resolves replies in order (BENCHMARKS.md, session 5).
 *
 * Semantics are the ones the drivers were built on with ioredis' fail-fast options:
 * - nothing is queued while the connection is down: `call` rejects at once and the caller falls
 *   back (cache bypassed, per-instance rate limits);
 * - commands issued in the same event-loop turn leave in one write (auto-pipelining);
 * - (not in ioredis) `fire` sends a command Redis is told not to answer (CLIENT REPLY SKIP), for
 *   work nobody waits on, where the handshake found the server honours it;
 * - reconnects run in the background with a growing delay;
 * - a server that stops answering is treated as gone: when the oldest command has waited longer
 *   than `commandTimeoutMs`, every pending command fails and the connection is rebuilt. A command
 *   that merely timed out could not stay behind on the connection: replies match commands by
 *   order.
 *
 * Events: `ready`, `close` (a connection that was up went down), `error` (with an Error; only
 * emitted when someone listens).
 */
export class RespClient extends EventEmitter implements RedisCommands {
  private state: RespStatus = 'connecting';
  private socket: Socket | undefined;
  private readonly reader = new RespReader();
  /** Commands written and not yet answered, oldest first (`head` is the oldest's index). */
  private queue: Pending[] = [];
  private head = 0;
  private out = '';
  private flushScheduled = false;
  private attempts = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private readonly host: string;
  private readonly port: number;
  private readonly tls: boolean;
  private readonly handshake: Array<Array<string | number>>;
  /** Learnt at each handshake; 'no' once a server did not honour SKIP, for good (no probe loop). */
  private skipSupport: 'unknown' | 'yes' | 'no' = 'unknown';

  constructor(
    url: string,
    private readonly options: RespClientOptions,
  ) {
    super();
    const parsed = new URL(url);
    this.host = parsed.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1';
    this.port = Number(parsed.port || 6379);
    this.tls = parsed.protocol === 'rediss:';
    this.handshake = [];
    const password = decodeURIComponent(parsed.password);
    const username = decodeURIComponent(parsed.username);
    if (password) this.handshake.push(username ? ['AUTH', username, password] : ['AUTH', password]);
    const db = Number(parsed.pathname.slice(1) || 0);
    if (!Number.isInteger(db) || db < 0) throw new Error('REDIS_URL: the database must be a number');
    if (db !== 0) this.handshake.push(['SELECT', db]);
    this.handshake.push(['CLIENT', 'SETNAME', options.name]);
    if (options.subscribe) this.handshake.push(['SUBSCRIBE', options.subscribe.channel]);
    this.open();
  }

  get status(): RespStatus {
    return this.state;
  }

  get skipsReplies(): boolean {
    return this.state === 'ready' && this.skipSupport === 'yes';
  }

  fire(command: string, ...args: Array<string | number>): void {
    if (!this.skipsReplies) throw new Error(`Redis connection is ${this.state}${this.state === 'ready' ? ' and does not skip replies' : ''}`);
    this.write(SKIP_NEXT_REPLY + encodeCommand([command, ...args]));
  }

  call(command: string, ...args: Array<string | number>): Promise<unknown> {
    if (this.state !== 'ready') return Promise.reject(new Error(`Redis connection is ${this.state}`));
    return this.send([command, ...args]);
  }

  /** Sends QUIT and waits for the server to close (at most `timeoutMs`); no reconnect after. */
  async quit(timeoutMs = 1000): Promise<void> {
    if (this.state === 'end') return;
    const socket = this.socket;
    if (this.state === 'ready' && socket) {
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      this.send(['QUIT']).catch(() => undefined);
      this.state = 'end';
      const timer = setTimeout(() => socket.destroy(), timeoutMs);
      await closed;
      clearTimeout(timer);
    }
    this.disconnect();
  }

  /** Closes at once; pending commands fail; no reconnect. */
  disconnect(): void {
    this.state = 'end';
    clearTimeout(this.reconnectTimer);
    this.socket?.destroy();
  }

  private send(args: Array<string | number>): Promise<unknown> {
    this.write(encodeCommand(args));
    return new Promise((resolve, reject) => {
      this.queue.push({ resolve, reject, sentAt: performance.now() });
    });
  }

  private write(encoded: string): void {
    this.out += encoded;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // setImmediate, not nextTick: runs after the turn's promise continuations, so the rate-limit
      // verdict and the cache lookup of one request (and those of every request read in the same
      // poll phase) share one write.
      setImmediate(this.flush);
    }
  }

  /**
   * Part of the handshake: a skipped ECHO, then one whose reply is awaited. A server that honours
   * CLIENT REPLY SKIP answers only the second; any other first reply (an error for an unknown
   * subcommand, the skipped ECHO's own, an OK) means it does not, and the connection is rebuilt
   * without the probe, since the replies still on their way can no longer be matched to commands.
   */
  private probeSkip(): Promise<unknown> {
    this.write(SKIP_NEXT_REPLY + encodeCommand(['ECHO', `${SKIP_PROBE}:skipped`]));
    return this.send(['ECHO', SKIP_PROBE]).then(
      (reply) => {
        if (reply === SKIP_PROBE) {
          this.skipSupport = 'yes';
          return;
        }
        this.skipSupport = 'no';
        throw new Error('Redis did not honour CLIENT REPLY SKIP; reconnecting without it');
      },
      (error: Error) => {
        // Only the server's own answer says anything about SKIP; a connection that dropped
        // during the handshake does not, and the next one probes again.
        if (!(error instanceof RedisReplyError)) throw error;
        this.skipSupport = 'no';
        throw new Error(`Redis refused CLIENT REPLY SKIP (${error.message}); reconnecting without it`);
      },
    );
  }

  private readonly flush = (): void => {
    this.flushScheduled = false;
    const text = this.out;
    this.out = '';
    if (text && this.socket && !this.socket.destroyed) this.socket.write(text);
  };

  private open(): void {
    const socket = this.tls
      ? tlsConnect({ host: this.host, port: this.port, servername: isIP(this.host) ? undefined : this.host, ...this.options.tls })
      : netConnect({ host: this.host, port: this.port });
    this.socket = socket;
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    const connectTimer = setTimeout(
      () => socket.destroy(new Error(`Redis did not become ready within ${this.options.connectTimeoutMs} ms`)),
      this.options.connectTimeoutMs,
    );
    socket.once(this.tls ? 'secureConnect' : 'connect', () => {
      // The handshake goes first on the new connection: AUTH, SELECT and SETNAME replies are
      // checked before anything else is accepted.
      const replies = this.handshake.map((command) => this.send(command));
      // A subscriber connection takes no other commands, and never needs to skip a reply.
      if (!this.options.subscribe && this.skipSupport !== 'no') replies.push(this.probeSkip());
      Promise.all(replies).then(
        () => {
          clearTimeout(connectTimer);
          if (this.socket !== socket || socket.destroyed) return;
          this.attempts = 0;
          this.state = 'ready';
          this.watchdog = setInterval(this.checkTimeouts, Math.max(10, this.options.commandTimeoutMs / 4));
          this.watchdog.unref();
          this.emit('ready');
        },
        (error: Error) => socket.destroy(error),
      );
    });
    socket.on('data', (chunk: Buffer) => {
      try {
        this.reader.feed(chunk, this.onReply);
      } catch (error) {
        socket.destroy(error as Error);
      }
    });
    let failure: Error | undefined;
    socket.on('error', (error: Error) => {
      failure = error;
      if (this.listenerCount('error') > 0) this.emit('error', error);
    });
    socket.on('close', () => {
      clearTimeout(connectTimer);
      if (this.socket !== socket) return;
      const wasReady = this.state === 'ready';
      this.socket = undefined;
      clearInterval(this.watchdog);
      this.reader.reset();
      this.out = '';
      // Pending commands fail with what took the connection down (a timeout says so).
      this.failPending(new Error(failure ? `Redis connection closed: ${failure.message}` : 'Redis connection closed'));
      if (wasReady) this.emit('close');
      if (this.state === 'end') return;
      this.state = 'reconnecting';
      this.attempts += 1;
      this.reconnectTimer = setTimeout(() => {
        if (this.state !== 'end') this.open();
      }, this.options.retryDelayMs(this.attempts));
    });
  }

  private readonly onReply = (reply: RespReply): void => {
    // In subscribed state Redis pushes ["message", channel, payload] with no command pending.
    if (this.head === this.queue.length && this.options.subscribe && Array.isArray(reply) && reply[0] === 'message') {
      this.options.subscribe.onMessage(String(reply[2]));
      return;
    }
    const pending = this.queue[this.head];
    if (!pending) throw new Error('a Redis reply came for no command');
    this.queue[this.head] = undefined as unknown as Pending;
    this.head += 1;
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    if (reply instanceof RedisReplyError) pending.reject(reply);
    else pending.resolve(reply);
  };

  private readonly checkTimeouts = (): void => {
    const oldest = this.queue[this.head];
    if (oldest && performance.now() - oldest.sentAt > this.options.commandTimeoutMs) {
      this.socket?.destroy(new Error(`Redis did not answer within ${this.options.commandTimeoutMs} ms`));
    }
  };

  private failPending(error: Error): void {
    const pending = this.queue;
    const head = this.head;
    this.queue = [];
    this.head = 0;
    for (let i = head; i < pending.length; i++) pending[i]?.reject(error);
  }
}
