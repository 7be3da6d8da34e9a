import { isIP } from 'node:net';
import { resolve } from 'node:path';
import { parseAllowedHosts } from '../jobs/callback-policy.js';

/**
 * Typed, validated configuration. `loadConfig(env)` is the only reader of `process.env` in the
 * code base (main.ts hands it the environment once), so tests build the same app from a plain
 * object and nothing reads the environment at import time.
 */
/** Longest cache TTL anyone may set: the default (CACHE_TTL_SECONDS), a routing rule's, a request header's. */
export const MAX_CACHE_TTL_SECONDS = 30 * 86400;

export type Role = 'api' | 'worker' | 'all';
export type UpstreamDriver = 'undici' | 'sdk';
export type StoreDriver = 'memory' | 'redis';

export type DatabaseConfig =
  | { driver: 'pglite'; dataDir: string }
  | { driver: 'postgres'; url: string };

export abstract class AppConfig {
  declare readonly role: Role;
  declare readonly host: string;
  declare readonly port: number;
  declare readonly bodyLimitBytes: number;
  /** Fastify's trustProxy: which hops' X-Forwarded-For to believe for the client's address (audit rows' `ip`). */
  declare readonly trustProxy: boolean | number | string[];
  declare readonly logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  declare readonly database: DatabaseConfig;
  /**
   * How long a request waits for a database statement on its path (key lookup, budget
   * reservation, idempotency claims, an async submit's checks and insert, a job poll, /v1/usage)
   * before it is answered 503: a database that stops answering must not hold requests for as
   * long as it is stuck.
   */
  declare readonly databaseRequestTimeoutMs: number;
  declare readonly redisUrl: string | undefined;
  /** Prepended to every Redis key the gateway writes, so deployments (and tests) can share one Redis. */
  declare readonly redisKeyPrefix: string;
  declare readonly adminApiKey: string | undefined;
  declare readonly telemetry: {
    /** OTLP/HTTP base URL for traces; unset = no tracer at all (no spans, no cost). */
    readonly otlpEndpoint: string | undefined;
    /** When set, GET /metrics wants `Authorization: Bearer <token>`; unset = open (keep it off the public ingress). */
    readonly metricsToken: string | undefined;
  };
  declare readonly shutdown: {
    /** After SIGTERM: how long in-flight requests and streams may run before they are ended. */
    readonly drainMs: number;
  };
  declare readonly upstream: {
    readonly driver: UpstreamDriver;
    /** true when no OPENROUTER_API_KEY is set: the built-in mock answers, marked in every response. */
    readonly mock: boolean;
    readonly baseUrl: string;
    readonly apiKey: string | undefined;
    readonly timeoutMs: number;
    readonly connections: number;
    /** OpenRouter attribution headers (HTTP-Referer / X-Title). */
    readonly referer: string;
    readonly title: string;
    /** Retries and backoff around every upstream call (issue #4); see UpstreamCaller. */
    readonly retry: UpstreamRetryConfig;
    /** Send the whole chain as OpenRouter `models` + `route: "fallback"` in one request. */
    readonly nativeFallback: boolean;
  };
  declare readonly routing: {
    /** How often each instance checks for a new routing version; changes must land within 2 s. */
    readonly refreshMs: number;
    /** Cap sent upstream (and reserved) when neither the request nor the rule sets one. */
    readonly defaultMaxTokens: number;
  };
  declare readonly auth: {
    /** How long a resolved key stays cached in memory; revocation must land within 2 s. */
    readonly keyCacheMs: number;
  };
  declare readonly budget: {
    /** A reservation older than this was left by a crashed instance and is released by the sweeper. */
    readonly reservationTtlMs: number;
    readonly sweepIntervalMs: number;
    /** Settles and cache-hit ledger rows wait at most this long before the batch writer stores them. */
    readonly flushMs: number;
    /** Entries per batched settle statement; this many waiting flush at once. */
    readonly flushBatch: number;
    /** PostgreSQL connections of the reservation pool (the request path's one budget statement). */
    readonly poolSize: number;
    /** Lifetime of a budget lease (headroom held once, drawn on by many requests); 0 = no leases. */
    readonly leaseMs: number;
    /** Worst cases a lease holds, of the request that asks for it. */
    readonly leaseRequests: number;
  };
  declare readonly pricing: {
    /** How often the upstream's /models prices are fetched again. */
    readonly refreshMs: number;
    /** USD per token (decimal strings) for a model no table prices, so a reservation is always bounded. */
    readonly fallbackPrompt: string;
    readonly fallbackCompletion: string;
  };
  declare readonly cache: {
    readonly driver: StoreDriver;
    readonly defaultTtlSeconds: number;
    readonly maxEntries: number;
    readonly maxBytes: number;
    /** Singleflight: how long identical requests wait for the first one's answer (and its fill lock's lifetime). */
    readonly waitMs: number;
    /**
     * Redis driver: how long an instance may answer a hit from its own near copy of an entry it
     * read or wrote, without asking Redis (0 = always ask). A delete drops the copies of every
     * instance when its flush message arrives, a few milliseconds after the delete answered.
     */
    readonly nearMs: number;
  };
  declare readonly audit: {
    /** The audit writer flushes at least this often while events wait. */
    readonly flushMs: number;
    /** Events per batched INSERT; a full batch flushes at once. */
    readonly batchSize: number;
    /** Events held in memory while the database refuses writes; beyond it they are counted and dropped. */
    readonly maxBuffered: number;
  };
  declare readonly rateLimit: {
    readonly driver: StoreDriver;
    readonly keyRpm: number;
    readonly userRpm: number;
    readonly departmentRpm: number;
    readonly adminRpm: number;
    /** Tokens per minute; undefined = no token limit unless an admin override sets one. */
    readonly keyTpm: number | undefined;
    readonly userTpm: number | undefined;
    readonly departmentTpm: number | undefined;
    /**
     * Share of a request limit, in percent, that one instance may count ahead in Redis and then
     * admit from locally (at most LEASE_MAX requests); 0 = every request asks Redis. Limits whose
     * share is under two requests are never leased.
     */
    readonly leasePercent: number;
  };
  declare readonly jobs: {
    /** inline: in-process (embedded default, one instance); bullmq: Redis, shared by api and worker processes. */
    readonly driver: JobsDriver;
    /** Jobs one process runs at once. */
    readonly concurrency: number;
    /** Backpressure: submits beyond this many queued + running jobs get 503 queue_full. */
    readonly maxQueued: number;
    /** Tries of a job that fails transiently (5xx, 429), the first included; then it is dead-lettered. */
    readonly maxAttempts: number;
    /** Exponential backoff between tries: base * 2^(try-1), capped. */
    readonly backoffMs: number;
    readonly backoffMaxMs: number;
    /** HMAC-SHA256 secret for `callback_url` deliveries; unset = callbacks are refused at submit. */
    readonly callbackSecret: string | undefined;
    /**
     * While a secret is rotated: deliveries also carry a signature with this one, so receivers
     * still on it keep verifying until they move to `callbackSecret`.
     */
    readonly callbackPreviousSecret: string | undefined;
    /**
     * Where callbacks may go (SSRF guard), normalised: `host`, `*.suffix`, `address/prefix`.
     * Empty = any public host; otherwise only these (a listed private host or range included).
     */
    readonly callbackAllowedHosts: readonly string[];
    /** Finished jobs (not dead-lettered) are deleted this long after they finished; 0 = kept for ever. */
    readonly retentionHours: number;
  };
}

export type JobsDriver = 'inline' | 'bullmq';

export interface UpstreamRetryConfig {
  /** Tries of one model (or one native-fallback request), the first included. */
  readonly attemptsPerModel: number;
  /** Full-jitter backoff: a random wait in [0, min(maxDelayMs, baseDelayMs * 2^retry)). */
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  /** An upstream retry-after longer than this is not waited for: the next model is tried instead. */
  readonly retryAfterCapMs: number;
  /** Whole chain, all attempts and waits included, until the answer (or the first stream event). */
  readonly deadlineMs: number;
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n  - ${problems.join('\n  - ')}`);
    this.name = 'ConfigError';
  }
}

/** Every variable the gateway reads, with a `sensitive` flag so logs can mask mechanically. */
export const CONFIG_VARIABLES = {
  PORT: { sensitive: false, help: 'HTTP port (default 8080)' },
  HOST: { sensitive: false, help: 'listen address (default 0.0.0.0)' },
  DATA_DIR: { sensitive: false, help: 'embedded database folder (default ./data)' },
  DATABASE_URL: { sensitive: true, help: 'postgres://… for production; unset = embedded PGlite' },
  REDIS_URL: { sensitive: true, help: 'redis://…; unset = in-memory drivers (one instance only)' },
  REDIS_KEY_PREFIX: { sensitive: false, help: 'prefix of every Redis key (default gatehouse:)' },
  OPENROUTER_API_KEY: { sensitive: true, help: 'upstream key; unset = built-in mock upstream' },
  OPENROUTER_BASE_URL: { sensitive: false, help: 'any OpenAI-compatible base URL' },
  UPSTREAM_DRIVER: { sensitive: false, help: 'undici (default, lean) | sdk (the official openai SDK)' },
  UPSTREAM_TIMEOUT_MS: { sensitive: false, help: 'per-attempt upstream timeout (default 60000)' },
  UPSTREAM_CONNECTIONS: { sensitive: false, help: 'keep-alive connections to the upstream (default 128)' },
  UPSTREAM_RETRY_ATTEMPTS: { sensitive: false, help: 'tries per model, the first included (default 2)' },
  UPSTREAM_RETRY_BASE_MS: { sensitive: false, help: 'backoff base for full-jitter retries (default 250)' },
  UPSTREAM_RETRY_MAX_DELAY_MS: { sensitive: false, help: 'largest backoff between retries (default 4000)' },
  UPSTREAM_RETRY_AFTER_MAX_MS: { sensitive: false, help: 'longest upstream retry-after honoured; longer ones skip to the next model (default 10000)' },
  UPSTREAM_DEADLINE_MS: { sensitive: false, help: 'total time for all attempts of one call (default 120000)' },
  UPSTREAM_NATIVE_FALLBACK: { sensitive: false, help: 'true | false: send fallbacks as OpenRouter models[] (default: true when the base URL host is openrouter.ai)' },
  APP_URL: { sensitive: false, help: 'HTTP-Referer sent to OpenRouter' },
  APP_TITLE: { sensitive: false, help: 'X-Title sent to OpenRouter (default Gatehouse)' },
  ADMIN_API_KEY: { sensitive: true, help: 'bootstrap admin key (16+ characters, printable ASCII without spaces)' },
  GATEHOUSE_ROLE: { sensitive: false, help: 'api | worker | all (default all); api and worker need DATABASE_URL and REDIS_URL' },
  BODY_LIMIT_BYTES: { sensitive: false, help: 'largest accepted request body (default 4194304)' },
  TRUST_PROXY: {
    sensitive: false,
    help: 'whose X-Forwarded-For gives the client address: unset/false (none), true (any), a hop count, or proxy IPs/CIDRs, comma-separated',
  },
  LOG_LEVEL: { sensitive: false, help: 'fatal|error|warn|info|debug|trace|silent (default info)' },
  OTEL_EXPORTER_OTLP_ENDPOINT: { sensitive: true, help: 'OTLP/HTTP collector base URL (/v1/traces is appended to its path, a query string kept); unset = tracing off' },
  METRICS_TOKEN: { sensitive: true, help: 'bearer token GET /metrics requires (16+ characters, printable ASCII without spaces); unset = /metrics is open (never expose it publicly)' },
  SHUTDOWN_DRAIN_MS: { sensitive: false, help: 'after SIGTERM, how long in-flight requests and streams may finish (default 25000)' },
  ROUTING_REFRESH_MS: { sensitive: false, help: 'routing version poll interval (default 1000)' },
  DEFAULT_MAX_TOKENS: { sensitive: false, help: 'cap when neither request nor rule sets one (default 1024)' },
  KEY_CACHE_MS: { sensitive: false, help: 'API key cache lifetime (default 1000)' },
  DATABASE_REQUEST_TIMEOUT_MS: {
    sensitive: false,
    help: 'how long a request waits for the database on its path (key lookup, budget reservation) before 503 unavailable (default 5000)',
  },
  BUDGET_RESERVATION_TTL_MS: { sensitive: false, help: 'request deadline: older budget reservations are released by the sweeper (default 600000)' },
  BUDGET_SWEEP_INTERVAL_MS: { sensitive: false, help: 'how often orphaned budget reservations are swept (default 60000)' },
  BUDGET_FLUSH_MS: { sensitive: false, help: 'settles and cache-hit ledger rows are written in batches at least this often (default 20)' },
  BUDGET_FLUSH_BATCH: { sensitive: false, help: 'settles and ledger rows per batched statement; this many waiting are written at once (default 500)' },
  BUDGET_POOL_SIZE: { sensitive: false, help: 'PostgreSQL connections for budget reservations (default 8)' },
  BUDGET_LEASE_MS: {
    sensitive: false,
    help: 'how long an instance draws on budget headroom it leased (one statement for many requests); 0 = one reservation statement per request (default 2000)',
  },
  BUDGET_LEASE_REQUESTS: { sensitive: false, help: 'a lease holds this many worst cases of the request that asks for it (default 32)' },
  PRICING_REFRESH_MS: { sensitive: false, help: "how often prices are re-read from the upstream's /models (default 3600000)" },
  PRICING_FALLBACK_PROMPT_USD: { sensitive: false, help: 'USD per prompt token for unpriced models (default 0.000015)' },
  PRICING_FALLBACK_COMPLETION_USD: { sensitive: false, help: 'USD per completion token for unpriced models (default 0.000075)' },
  CACHE_DRIVER: { sensitive: false, help: 'memory | redis (default: redis when REDIS_URL is set)' },
  CACHE_TTL_SECONDS: { sensitive: false, help: 'default response cache TTL (default 300)' },
  CACHE_MAX_ENTRIES: { sensitive: false, help: 'memory cache entry bound (default 10000)' },
  CACHE_MAX_BYTES: { sensitive: false, help: 'memory cache size bound (default 67108864)' },
  CACHE_WAIT_MS: { sensitive: false, help: 'how long identical concurrent requests wait for the first answer (default 15000)' },
  RATE_LIMIT_DRIVER: { sensitive: false, help: 'memory | redis (default: redis when REDIS_URL is set)' },
  RATE_LIMIT_KEY_RPM: { sensitive: false, help: 'requests per minute per key (default 600)' },
  RATE_LIMIT_USER_RPM: { sensitive: false, help: 'requests per minute per user (default 1200)' },
  RATE_LIMIT_DEPARTMENT_RPM: { sensitive: false, help: 'requests per minute per department (default 6000)' },
  RATE_LIMIT_ADMIN_RPM: { sensitive: false, help: 'admin API requests per minute per key (default 300)' },
  RATE_LIMIT_KEY_TPM: { sensitive: false, help: 'tokens per minute per key (default: none)' },
  RATE_LIMIT_USER_TPM: { sensitive: false, help: 'tokens per minute per user (default: none)' },
  RATE_LIMIT_DEPARTMENT_TPM: { sensitive: false, help: 'tokens per minute per department (default: none)' },
  CACHE_NEAR_SECONDS: { sensitive: false, help: 'Redis cache: seconds an instance answers a hit from its near copy without asking Redis (default 10; 0 = always ask)' },
  RATE_LIMIT_LEASE_PERCENT: { sensitive: false, help: 'share of a request limit one instance may take ahead from Redis, 0-50 (default 2; 0 = ask Redis on every request)' },
  AUDIT_FLUSH_MS: { sensitive: false, help: 'audit events are written in batches at least this often (default 250)' },
  AUDIT_BATCH_SIZE: { sensitive: false, help: 'audit events per batched INSERT (default 500)' },
  AUDIT_MAX_BUFFERED: { sensitive: false, help: 'audit events kept in memory while the database is down (default 100000)' },
  JOBS_DRIVER: { sensitive: false, help: 'inline | bullmq (default: bullmq when REDIS_URL is set)' },
  JOBS_CONCURRENCY: { sensitive: false, help: 'async jobs one process runs at once (default 8)' },
  JOBS_MAX_QUEUED: { sensitive: false, help: 'queued + running jobs before submits get 503 queue_full (default 1000)' },
  JOBS_MAX_ATTEMPTS: { sensitive: false, help: 'tries of a transiently failing job before it is dead-lettered (default 3)' },
  JOBS_BACKOFF_MS: { sensitive: false, help: 'base of the exponential backoff between job tries (default 2000)' },
  JOBS_BACKOFF_MAX_MS: { sensitive: false, help: 'largest wait between job tries (default 60000)' },
  JOBS_CALLBACK_SECRET: { sensitive: true, help: 'HMAC-SHA256 secret signing callback_url deliveries; unset = callbacks refused' },
  JOBS_CALLBACK_SECRET_PREVIOUS: {
    sensitive: true,
    help: 'while rotating JOBS_CALLBACK_SECRET: the old secret, whose signature every delivery also carries until receivers have moved (unset after)',
  },
  JOBS_CALLBACK_ALLOWED_HOSTS: {
    sensitive: false,
    help: 'comma-separated hosts, *.suffixes and IP CIDRs callback_url may reach (only these); unset = any public host, never private/loopback/link-local',
  },
  JOBS_RETENTION_HOURS: {
    sensitive: false,
    help: 'hours a finished job (result, error, request body) is kept before it is deleted; 0 = for ever, else at least 24 (default 720)',
  },
} as const;

export type ConfigVariable = keyof typeof CONFIG_VARIABLES;
export type Env = Partial<Record<string, string | undefined>>;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
/** What undici (and Node's http) accept in a header value: tab, visible ASCII and space, Latin-1. */
const HEADER_TEXT = /^[\t\x20-\x7e\x80-\xff]*$/;
/** An API key is a token: visible ASCII, no spaces. */
const HEADER_TOKEN = /^[\x21-\x7e]+$/;

export function loadConfig(env: Env, cwd = process.cwd()): AppConfig {
  const problems: string[] = [];
  const str = (name: ConfigVariable): string | undefined => {
    const v = env[name];
    return v === undefined || v.trim() === '' ? undefined : v.trim();
  };
  const int = (name: ConfigVariable, fallback: number, min: number, max: number): number => {
    const v = str(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) {
      problems.push(`${name} must be an integer from ${min} to ${max}, got "${v}"`);
      return fallback;
    }
    return n;
  };
  function oneOf<T extends string>(name: ConfigVariable, allowed: readonly T[], fallback: T): T {
    const v = str(name);
    if (v === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(v)) {
      problems.push(`${name} must be one of ${allowed.join(', ')}, got "${v}"`);
      return fallback;
    }
    return v as T;
  }
  /**
   * Behind a load balancer or an ingress every request comes from it: without this the audit's
   * `ip` is the proxy's. Addresses are checked here, so a typo stops the start instead of
   * trusting nobody (or everybody) in silence.
   */
  const trustProxy = (): boolean | number | string[] => {
    const v = str('TRUST_PROXY');
    if (v === undefined || v === 'false') return false;
    if (v === 'true') return true;
    if (/^\d+$/.test(v)) return int('TRUST_PROXY', 0, 1, 100);
    const entries = v.split(',').map((e) => e.trim()).filter((e) => e !== '');
    const bad = entries.filter((e) => {
      const [address, bits, extra] = e.split('/');
      if (extra !== undefined || isIP(address ?? '') === 0) return true;
      if (bits === undefined) return false;
      const max = isIP(address ?? '') === 4 ? 32 : 128;
      return !/^\d+$/.test(bits) || Number(bits) > max;
    });
    if (entries.length === 0 || bad.length > 0) {
      problems.push(`TRUST_PROXY must be true, false, a hop count or proxy addresses (IP or CIDR, comma-separated); not an address: ${bad.slice(0, 3).join(', ') || '(empty)'}`);
      return false;
    }
    return entries;
  };
  // Checked here, not left to listen(): that comes after the database is opened (initdb'd and
  // migrated on a fresh DATA_DIR) and the first admin key is generated, and its "getaddrinfo
  // ENOTFOUND" names no variable. Names are not resolved (loading stays synchronous, and a name
  // the resolver cannot find yet is listen's to report), only their syntax (RFC 1123, plus the
  // underscores container DNS names may carry) is checked; an all-numeric last label is an IPv4
  // literal gone wrong (999.1.1.1), not a name.
  const listenHost = (): string => {
    const v = str('HOST');
    if (v === undefined) return '0.0.0.0';
    const name = v.endsWith('.') ? v.slice(0, -1) : v;
    const labels = name.split('.');
    const isName =
      name.length > 0 &&
      name.length <= 253 &&
      labels.every((label) => /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/i.test(label)) &&
      !/^\d+$/.test(labels[labels.length - 1] ?? '');
    if (isIP(v) === 0 && !isName) {
      const hint = v.startsWith('[') ? ' (write an IPv6 address without brackets, e.g. ::)' : '';
      problems.push(`HOST must be an IP address (such as 0.0.0.0, 127.0.0.1 or ::) or a host name, got "${v}"${hint}`);
    }
    return v;
  };
  const usdPerToken = (name: ConfigVariable, fallback: string): string => {
    const v = str(name);
    if (v === undefined) return fallback;
    if (!/^\d+(\.\d+)?$/.test(v)) problems.push(`${name} must be a non-negative decimal USD amount per token, got "${v}"`);
    return v;
  };
  const url = (name: ConfigVariable, protocols: string[], bare = false): string | undefined => {
    const v = str(name);
    if (v === undefined) return undefined;
    try {
      const parsed = new URL(v);
      if (!protocols.includes(parsed.protocol)) problems.push(`${name} must use ${protocols.join(' or ')}, got ${parsed.protocol}`);
      // A base URL other URLs are built on: credentials in it would be logged and then dropped
      // (the upstream pool connects to the origin), a query string or fragment silently lost.
      // Named, never echoed.
      if (bare) {
        const extras = [
          parsed.username !== '' || parsed.password !== '' ? 'credentials (user:password@)' : undefined,
          parsed.search !== '' || v.includes('?') ? 'a query string' : undefined,
          parsed.hash !== '' || v.includes('#') ? 'a fragment' : undefined,
        ].filter((x): x is string => x !== undefined);
        if (extras.length > 0) {
          problems.push(`${name} must not contain ${extras.join(', ')}: give the upstream key in OPENROUTER_API_KEY and the base URL alone`);
        }
      }
      // new URL() keeps "50%off" as it is; the clients decodeURIComponent() it and the start then
      // dies as "URI malformed", naming nothing.
      try {
        for (const part of [parsed.username, parsed.password, parsed.pathname]) decodeURIComponent(part);
      } catch {
        problems.push(`${name} has a malformed %-escape in its user name, password or path (write a literal % as %25)`);
      }
    } catch {
      // Never echo the value: URLs here may carry passwords.
      problems.push(`${name} is not a valid URL`);
    }
    return v;
  };

  // Values sent as upstream request headers. A character an HTTP header cannot carry (a pasted
  // typographic dash or quote, a line break inside the value) would otherwise fail every call as
  // an "upstream connection" error; refusing to start names the variable instead.
  const headerValue = (name: ConfigVariable, token: boolean): string | undefined => {
    const v = str(name);
    if (v !== undefined && !(token ? HEADER_TOKEN : HEADER_TEXT).test(v)) {
      // Never echo the value: the API key is a secret.
      problems.push(`${name} contains characters an HTTP header cannot carry (${token ? 'printable ASCII without spaces' : 'printable ASCII and Latin-1'} only)`);
    }
    return v;
  };

  // Secrets presented as `Authorization: Bearer <value>`, which the guards read as one run of
  // non-space characters: a passphrase with a space could be set but never presented.
  const bearerToken = (name: ConfigVariable): string | undefined => {
    const v = str(name);
    if (v !== undefined && !HEADER_TOKEN.test(v)) {
      problems.push(`${name} must be printable ASCII without spaces: it is sent as "Authorization: Bearer <${name}>"`);
    }
    return v;
  };

  const databaseUrl = url('DATABASE_URL', ['postgres:', 'postgresql:']);
  const redisUrl = url('REDIS_URL', ['redis:', 'rediss:']);
  // RespClient's rule (src/redis/resp-client.ts): it applies it only at module init, after the
  // embedded database has been opened and migrated, and fails the start without the other problems.
  if (redisUrl !== undefined && URL.canParse(redisUrl)) {
    const db = Number(new URL(redisUrl).pathname.slice(1) || 0);
    if (!Number.isInteger(db) || db < 0) problems.push('REDIS_URL: the database (the path after the host) must be a number, like redis://host:6379/0');
  }
  const apiKey = headerValue('OPENROUTER_API_KEY', true);
  const baseUrl = (url('OPENROUTER_BASE_URL', ['http:', 'https:'], true) ?? 'https://openrouter.ai/api/v1').replace(/\/+$/, '');
  const storeDefault: StoreDriver = redisUrl ? 'redis' : 'memory';
  const cacheDriver = oneOf('CACHE_DRIVER', ['memory', 'redis'] as const, storeDefault);
  const rateLimitDriver = oneOf('RATE_LIMIT_DRIVER', ['memory', 'redis'] as const, storeDefault);
  for (const [name, driver] of [['CACHE_DRIVER', cacheDriver], ['RATE_LIMIT_DRIVER', rateLimitDriver]] as const) {
    if (driver === 'redis' && !redisUrl) problems.push(`${name}=redis needs REDIS_URL`);
  }
  const nativeFallback = oneOf('UPSTREAM_NATIVE_FALLBACK', ['true', 'false', 'auto'] as const, 'auto');
  const role = oneOf('GATEHOUSE_ROLE', ['api', 'worker', 'all'] as const, 'all');
  const jobsDriver = oneOf('JOBS_DRIVER', ['inline', 'bullmq'] as const, redisUrl ? 'bullmq' : 'inline');
  if (jobsDriver === 'bullmq' && !redisUrl) problems.push('JOBS_DRIVER=bullmq needs REDIS_URL');
  // api and worker are separate processes: only a queue in Redis can connect them. An in-process
  // queue would leave an api instance's jobs unprocessed forever, and a worker with nothing to do.
  if (role !== 'all' && jobsDriver !== 'bullmq') {
    problems.push(`GATEHOUSE_ROLE=${role} needs the shared BullMQ queue: set REDIS_URL (the embedded in-memory queue cannot be shared between processes), or use GATEHOUSE_ROLE=all`);
  }
  // The queue carries only job ids: on embedded databases the api would answer 202 with a row only
  // its own database holds, and the worker would drop the message it cannot find, leaving the job
  // queued for ever.
  if (role !== 'all' && databaseUrl === undefined) {
    problems.push(`GATEHOUSE_ROLE=${role} needs DATABASE_URL: job rows must be in a database every process shares (the embedded database belongs to one process), or use GATEHOUSE_ROLE=all`);
  }
  const jobsCallbackSecret = str('JOBS_CALLBACK_SECRET');
  if (jobsCallbackSecret !== undefined && jobsCallbackSecret.length < 16) problems.push('JOBS_CALLBACK_SECRET must be at least 16 characters');
  const jobsCallbackPrevious = str('JOBS_CALLBACK_SECRET_PREVIOUS');
  if (jobsCallbackPrevious !== undefined) {
    if (jobsCallbackSecret === undefined) problems.push('JOBS_CALLBACK_SECRET_PREVIOUS is set without JOBS_CALLBACK_SECRET (the secret it is rotated to)');
    else if (jobsCallbackPrevious === jobsCallbackSecret) problems.push('JOBS_CALLBACK_SECRET_PREVIOUS must differ from JOBS_CALLBACK_SECRET');
    if (jobsCallbackPrevious.length < 16) problems.push('JOBS_CALLBACK_SECRET_PREVIOUS must be at least 16 characters');
  }
  const callbackHosts = parseAllowedHosts(str('JOBS_CALLBACK_ALLOWED_HOSTS'));
  problems.push(...callbackHosts.problems.map((problem) => `JOBS_CALLBACK_ALLOWED_HOSTS: ${problem}`));
  const jobsRetentionHours = int('JOBS_RETENTION_HOURS', 720, 0, 876_000);
  // A job deleted sooner would free its idempotency-key inside the 24 h a repeat is promised the same job.
  if (jobsRetentionHours > 0 && jobsRetentionHours < 24) {
    problems.push(`JOBS_RETENTION_HOURS must be 0 (keep jobs for ever) or at least 24, got "${jobsRetentionHours}"`);
  }
  const adminApiKey = bearerToken('ADMIN_API_KEY');
  if (adminApiKey !== undefined && adminApiKey.length < 16) problems.push('ADMIN_API_KEY must be at least 16 characters');
  const metricsToken = bearerToken('METRICS_TOKEN');
  if (metricsToken !== undefined && metricsToken.length < 16) problems.push('METRICS_TOKEN must be at least 16 characters');

  const config: AppConfig = {
    role,
    host: listenHost(),
    port: int('PORT', 8080, 0, 65535),
    bodyLimitBytes: int('BODY_LIMIT_BYTES', 4 * 1024 * 1024, 1024, 512 * 1024 * 1024),
    trustProxy: trustProxy(),
    logLevel: oneOf('LOG_LEVEL', LOG_LEVELS, 'info'),
    database: databaseUrl ? { driver: 'postgres', url: databaseUrl } : { driver: 'pglite', dataDir: resolve(cwd, str('DATA_DIR') ?? './data') },
    redisUrl,
    redisKeyPrefix: str('REDIS_KEY_PREFIX') ?? 'gatehouse:',
    adminApiKey,
    telemetry: { otlpEndpoint: url('OTEL_EXPORTER_OTLP_ENDPOINT', ['http:', 'https:'])?.replace(/\/+$/, ''), metricsToken },
    shutdown: { drainMs: int('SHUTDOWN_DRAIN_MS', 25_000, 0, 600_000) },
    upstream: {
      driver: oneOf('UPSTREAM_DRIVER', ['undici', 'sdk'] as const, 'undici'),
      mock: apiKey === undefined,
      baseUrl,
      apiKey,
      timeoutMs: int('UPSTREAM_TIMEOUT_MS', 60_000, 100, 3_600_000),
      connections: int('UPSTREAM_CONNECTIONS', 128, 1, 10_000),
      referer: headerValue('APP_URL', false) ?? 'https://github.com/gatehouse/gatehouse',
      title: headerValue('APP_TITLE', false) ?? 'Gatehouse',
      retry: {
        attemptsPerModel: int('UPSTREAM_RETRY_ATTEMPTS', 2, 1, 10),
        baseDelayMs: int('UPSTREAM_RETRY_BASE_MS', 250, 0, 60_000),
        maxDelayMs: int('UPSTREAM_RETRY_MAX_DELAY_MS', 4000, 0, 600_000),
        retryAfterCapMs: int('UPSTREAM_RETRY_AFTER_MAX_MS', 10_000, 0, 600_000),
        deadlineMs: int('UPSTREAM_DEADLINE_MS', 120_000, 100, 3_600_000),
      },
      nativeFallback: nativeFallback === 'auto' ? isOpenRouter(baseUrl) : nativeFallback === 'true',
    },
    routing: {
      refreshMs: int('ROUTING_REFRESH_MS', 1000, 50, 2000),
      defaultMaxTokens: int('DEFAULT_MAX_TOKENS', 1024, 1, 1_000_000),
    },
    auth: { keyCacheMs: int('KEY_CACHE_MS', 1000, 0, 2000) },
    databaseRequestTimeoutMs: int('DATABASE_REQUEST_TIMEOUT_MS', 5000, 100, 600_000),
    budget: {
      reservationTtlMs: int('BUDGET_RESERVATION_TTL_MS', 600_000, 1000, 86_400_000),
      sweepIntervalMs: int('BUDGET_SWEEP_INTERVAL_MS', 60_000, 100, 3_600_000),
      flushMs: int('BUDGET_FLUSH_MS', 20, 1, 60_000),
      flushBatch: int('BUDGET_FLUSH_BATCH', 500, 1, 10_000),
      poolSize: int('BUDGET_POOL_SIZE', 8, 1, 100),
      leaseMs: int('BUDGET_LEASE_MS', 2000, 0, 60_000),
      leaseRequests: int('BUDGET_LEASE_REQUESTS', 32, 2, 1000),
    },
    pricing: {
      refreshMs: int('PRICING_REFRESH_MS', 3_600_000, 1000, 7 * 86_400_000),
      fallbackPrompt: usdPerToken('PRICING_FALLBACK_PROMPT_USD', '0.000015'),
      fallbackCompletion: usdPerToken('PRICING_FALLBACK_COMPLETION_USD', '0.000075'),
    },
    cache: {
      driver: cacheDriver,
      defaultTtlSeconds: int('CACHE_TTL_SECONDS', 300, 1, MAX_CACHE_TTL_SECONDS),
      maxEntries: int('CACHE_MAX_ENTRIES', 10_000, 1, 10_000_000),
      maxBytes: int('CACHE_MAX_BYTES', 64 * 1024 * 1024, 1024, 16 * 1024 * 1024 * 1024),
      waitMs: int('CACHE_WAIT_MS', 15_000, 0, 600_000),
      nearMs: int('CACHE_NEAR_SECONDS', 10, 0, 3600) * 1000,
    },
    audit: {
      flushMs: int('AUDIT_FLUSH_MS', 250, 5, 60_000),
      batchSize: int('AUDIT_BATCH_SIZE', 500, 1, 10_000),
      maxBuffered: int('AUDIT_MAX_BUFFERED', 100_000, 10, 10_000_000),
    },
    rateLimit: {
      driver: rateLimitDriver,
      keyRpm: int('RATE_LIMIT_KEY_RPM', 600, 1, 10_000_000),
      userRpm: int('RATE_LIMIT_USER_RPM', 1200, 1, 10_000_000),
      departmentRpm: int('RATE_LIMIT_DEPARTMENT_RPM', 6000, 1, 10_000_000),
      adminRpm: int('RATE_LIMIT_ADMIN_RPM', 300, 1, 10_000_000),
      keyTpm: str('RATE_LIMIT_KEY_TPM') === undefined ? undefined : int('RATE_LIMIT_KEY_TPM', 0, 1, 1_000_000_000),
      userTpm: str('RATE_LIMIT_USER_TPM') === undefined ? undefined : int('RATE_LIMIT_USER_TPM', 0, 1, 1_000_000_000),
      departmentTpm: str('RATE_LIMIT_DEPARTMENT_TPM') === undefined ? undefined : int('RATE_LIMIT_DEPARTMENT_TPM', 0, 1, 1_000_000_000),
      leasePercent: int('RATE_LIMIT_LEASE_PERCENT', 2, 0, 50),
    },
    jobs: {
      driver: jobsDriver,
      concurrency: int('JOBS_CONCURRENCY', 8, 1, 1000),
      maxQueued: int('JOBS_MAX_QUEUED', 1000, 1, 10_000_000),
      maxAttempts: int('JOBS_MAX_ATTEMPTS', 3, 1, 100),
      backoffMs: int('JOBS_BACKOFF_MS', 2000, 1, 3_600_000),
      backoffMaxMs: int('JOBS_BACKOFF_MAX_MS', 60_000, 1, 86_400_000),
      callbackSecret: jobsCallbackSecret,
      callbackPreviousSecret: jobsCallbackPrevious,
      callbackAllowedHosts: callbackHosts.entries,
      retentionHours: jobsRetentionHours,
    },
  };
  // A reservation swept while its request may still be running would let that budget overspend.
  // A lease is drawn on for BUDGET_LEASE_MS, and its last draw may run for a whole deadline after
  // that: the sweeper must not release it (and the money it holds) before.
  if (config.budget.reservationTtlMs <= config.upstream.retry.deadlineMs + config.budget.leaseMs) {
    problems.push(
      `BUDGET_RESERVATION_TTL_MS (${config.budget.reservationTtlMs}) must be longer than UPSTREAM_DEADLINE_MS (${config.upstream.retry.deadlineMs}) + BUDGET_LEASE_MS (${config.budget.leaseMs})`,
    );
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return config;
}

/** OpenRouter walks a `models` list itself; other OpenAI-compatible upstreams would reject it. */
function isOpenRouter(baseUrl: string): boolean {
  try {
    const host = new URL(baseUrl).hostname;
    return host === 'openrouter.ai' || host.endsWith('.openrouter.ai');
  } catch {
    return false;
  }
}

/**
 * A URL as it may be logged: scheme, host, port and path only. User, password, query string and
 * fragment are dropped (any may hold a secret); something that is not a URL is not printed.
 */
export function loggableUrl(value: string): string {
  try {
    const u = new URL(value);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '(not a valid URL)';
  }
}

/** The configuration as it may be logged: secrets reduced to "set"/"unset", URLs without credentials. */
export function describeConfig(config: AppConfig): Record<string, unknown> {
  return {
    role: config.role,
    port: config.port,
    database: config.database.driver === 'postgres' ? 'postgres (DATABASE_URL set)' : `pglite (${config.database.dataDir})`,
    redis: config.redisUrl ? 'set' : 'unset (in-memory drivers)',
    upstream: config.upstream.mock ? 'MOCK (no OPENROUTER_API_KEY)' : `${loggableUrl(config.upstream.baseUrl)} via ${config.upstream.driver}`,
    upstreamRetry: { ...config.upstream.retry, nativeFallback: config.upstream.nativeFallback },
    cache: config.cache.driver,
    rateLimit: config.rateLimit.driver,
    adminApiKey: config.adminApiKey ? 'set' : 'unset',
    tracing: config.telemetry.otlpEndpoint ? 'otlp (OTEL_EXPORTER_OTLP_ENDPOINT set)' : 'off',
    metricsToken: config.telemetry.metricsToken ? 'set' : 'unset (/metrics open)',
    shutdownDrainMs: config.shutdown.drainMs,
    jobs: {
      ...config.jobs,
      callbackSecret: config.jobs.callbackSecret ? 'set' : 'unset',
      callbackPreviousSecret: config.jobs.callbackPreviousSecret ? 'set' : 'unset',
    },
  };
}
