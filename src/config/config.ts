import { resolve } from 'node:path';

/**
 * Typed, validated configuration. `loadConfig(env)` is the only reader of `process.env` in the
 * code base (main.ts hands it the environment once), so tests build the same app from a plain
 * object and nothing reads the environment at import time.
 */
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
  declare readonly logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  declare readonly database: DatabaseConfig;
  declare readonly redisUrl: string | undefined;
  declare readonly adminApiKey: string | undefined;
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
  declare readonly cache: { readonly driver: StoreDriver; readonly defaultTtlSeconds: number; readonly maxEntries: number; readonly maxBytes: number };
  declare readonly rateLimit: {
    readonly driver: StoreDriver;
    readonly keyRpm: number;
    readonly userRpm: number;
    readonly departmentRpm: number;
    readonly adminRpm: number;
  };
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
  OPENROUTER_API_KEY: { sensitive: true, help: 'upstream key; unset = built-in mock upstream' },
  OPENROUTER_BASE_URL: { sensitive: false, help: 'any OpenAI-compatible base URL' },
  UPSTREAM_DRIVER: { sensitive: false, help: 'undici (default, lean) | sdk (the official openai SDK)' },
  UPSTREAM_TIMEOUT_MS: { sensitive: false, help: 'per-attempt upstream timeout (default 60000)' },
  UPSTREAM_CONNECTIONS: { sensitive: false, help: 'keep-alive connections to the upstream (default 128)' },
  APP_URL: { sensitive: false, help: 'HTTP-Referer sent to OpenRouter' },
  APP_TITLE: { sensitive: false, help: 'X-Title sent to OpenRouter (default Gatehouse)' },
  ADMIN_API_KEY: { sensitive: true, help: 'bootstrap admin key' },
  GATEHOUSE_ROLE: { sensitive: false, help: 'api | worker | all (default all)' },
  BODY_LIMIT_BYTES: { sensitive: false, help: 'largest accepted request body (default 4194304)' },
  LOG_LEVEL: { sensitive: false, help: 'fatal|error|warn|info|debug|trace|silent (default info)' },
  ROUTING_REFRESH_MS: { sensitive: false, help: 'routing version poll interval (default 1000)' },
  DEFAULT_MAX_TOKENS: { sensitive: false, help: 'cap when neither request nor rule sets one (default 1024)' },
  KEY_CACHE_MS: { sensitive: false, help: 'API key cache lifetime (default 1000)' },
  CACHE_DRIVER: { sensitive: false, help: 'memory | redis (default: redis when REDIS_URL is set)' },
  CACHE_TTL_SECONDS: { sensitive: false, help: 'default response cache TTL (default 300)' },
  CACHE_MAX_ENTRIES: { sensitive: false, help: 'memory cache entry bound (default 10000)' },
  CACHE_MAX_BYTES: { sensitive: false, help: 'memory cache size bound (default 67108864)' },
  RATE_LIMIT_DRIVER: { sensitive: false, help: 'memory | redis (default: redis when REDIS_URL is set)' },
  RATE_LIMIT_KEY_RPM: { sensitive: false, help: 'requests per minute per key (default 600)' },
  RATE_LIMIT_USER_RPM: { sensitive: false, help: 'requests per minute per user (default 1200)' },
  RATE_LIMIT_DEPARTMENT_RPM: { sensitive: false, help: 'requests per minute per department (default 6000)' },
  RATE_LIMIT_ADMIN_RPM: { sensitive: false, help: 'admin API requests per minute per key (default 300)' },
} as const;

export type ConfigVariable = keyof typeof CONFIG_VARIABLES;
export type Env = Partial<Record<string, string | undefined>>;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

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
  const url = (name: ConfigVariable, protocols: string[]): string | undefined => {
    const v = str(name);
    if (v === undefined) return undefined;
    try {
      const parsed = new URL(v);
      if (!protocols.includes(parsed.protocol)) problems.push(`${name} must use ${protocols.join(' or ')}, got ${parsed.protocol}`);
    } catch {
      // Never echo the value: URLs here may carry passwords.
      problems.push(`${name} is not a valid URL`);
    }
    return v;
  };

  const databaseUrl = url('DATABASE_URL', ['postgres:', 'postgresql:']);
  const redisUrl = url('REDIS_URL', ['redis:', 'rediss:']);
  const apiKey = str('OPENROUTER_API_KEY');
  const baseUrl = (url('OPENROUTER_BASE_URL', ['http:', 'https:']) ?? 'https://openrouter.ai/api/v1').replace(/\/+$/, '');
  const storeDefault: StoreDriver = redisUrl ? 'redis' : 'memory';
  const cacheDriver = oneOf('CACHE_DRIVER', ['memory', 'redis'] as const, storeDefault);
  const rateLimitDriver = oneOf('RATE_LIMIT_DRIVER', ['memory', 'redis'] as const, storeDefault);
  for (const [name, driver] of [['CACHE_DRIVER', cacheDriver], ['RATE_LIMIT_DRIVER', rateLimitDriver]] as const) {
    if (driver === 'redis' && !redisUrl) problems.push(`${name}=redis needs REDIS_URL`);
  }
  const role = oneOf('GATEHOUSE_ROLE', ['api', 'worker', 'all'] as const, 'all');
  const adminApiKey = str('ADMIN_API_KEY');
  if (adminApiKey !== undefined && adminApiKey.length < 16) problems.push('ADMIN_API_KEY must be at least 16 characters');

  const config: AppConfig = {
    role,
    host: str('HOST') ?? '0.0.0.0',
    port: int('PORT', 8080, 0, 65535),
    bodyLimitBytes: int('BODY_LIMIT_BYTES', 4 * 1024 * 1024, 1024, 512 * 1024 * 1024),
    logLevel: oneOf('LOG_LEVEL', LOG_LEVELS, 'info'),
    database: databaseUrl ? { driver: 'postgres', url: databaseUrl } : { driver: 'pglite', dataDir: resolve(cwd, str('DATA_DIR') ?? './data') },
    redisUrl,
    adminApiKey,
    upstream: {
      driver: oneOf('UPSTREAM_DRIVER', ['undici', 'sdk'] as const, 'undici'),
      mock: apiKey === undefined,
      baseUrl,
      apiKey,
      timeoutMs: int('UPSTREAM_TIMEOUT_MS', 60_000, 100, 3_600_000),
      connections: int('UPSTREAM_CONNECTIONS', 128, 1, 10_000),
      referer: str('APP_URL') ?? 'https://github.com/gatehouse/gatehouse',
      title: str('APP_TITLE') ?? 'Gatehouse',
    },
    routing: {
      refreshMs: int('ROUTING_REFRESH_MS', 1000, 50, 2000),
      defaultMaxTokens: int('DEFAULT_MAX_TOKENS', 1024, 1, 1_000_000),
    },
    auth: { keyCacheMs: int('KEY_CACHE_MS', 1000, 0, 2000) },
    cache: {
      driver: cacheDriver,
      defaultTtlSeconds: int('CACHE_TTL_SECONDS', 300, 1, 30 * 86400),
      maxEntries: int('CACHE_MAX_ENTRIES', 10_000, 1, 10_000_000),
      maxBytes: int('CACHE_MAX_BYTES', 64 * 1024 * 1024, 1024, 16 * 1024 * 1024 * 1024),
    },
    rateLimit: {
      driver: rateLimitDriver,
      keyRpm: int('RATE_LIMIT_KEY_RPM', 600, 1, 10_000_000),
      userRpm: int('RATE_LIMIT_USER_RPM', 1200, 1, 10_000_000),
      departmentRpm: int('RATE_LIMIT_DEPARTMENT_RPM', 6000, 1, 10_000_000),
      adminRpm: int('RATE_LIMIT_ADMIN_RPM', 300, 1, 10_000_000),
    },
  };
  if (problems.length > 0) throw new ConfigError(problems);
  return config;
}

/** The configuration as it may be logged: secrets reduced to "set"/"unset". */
export function describeConfig(config: AppConfig): Record<string, unknown> {
  return {
    role: config.role,
    port: config.port,
    database: config.database.driver === 'postgres' ? 'postgres (DATABASE_URL set)' : `pglite (${config.database.dataDir})`,
    redis: config.redisUrl ? 'set' : 'unset (in-memory drivers)',
    upstream: config.upstream.mock ? 'MOCK (no OPENROUTER_API_KEY)' : `${config.upstream.baseUrl} via ${config.upstream.driver}`,
    cache: config.cache.driver,
    rateLimit: config.rateLimit.driver,
    adminApiKey: config.adminApiKey ? 'set' : 'unset',
  };
}
