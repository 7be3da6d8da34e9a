import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import OpenAI from 'openai';
import type { Logger } from 'pino';
import { expect } from 'vitest';
import { startStubUpstream, type StubUpstream } from '../../libs/stub-upstream/src/index.js';
import { type AppConfig, type Env, loadConfig } from '../../src/config/config.js';
import type { Clock } from '../../src/core/clock.js';
import { createLogger } from '../../src/core/logger.js';
import { pollUntil } from '../../src/core/testing/poll-until.js';
import { createGateway, createWorker, type Gateway, type WorkerProcess } from '../../src/gateway.js';
import { createTestDatabase, type DbKind, type TestDatabase } from './databases.js';
import { startTcpProxy, type TcpProxy } from './redis.js';

export interface HttpResult<T = unknown> {
  status: number;
  headers: Headers;
  body: T;
}

/** Minimal JSON-over-fetch client for admin and raw calls (the openai SDK covers /v1). */
export class ApiClient {
  constructor(
    readonly baseUrl: string,
    readonly key: string | undefined,
  ) {}

  async request<T = unknown>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<HttpResult<T>> {
    const res = await fetch(`${this.baseUrl}${path}`, {
      method,
      headers: {
        ...(this.key ? { authorization: `Bearer ${this.key}` } : {}),
        ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        ...headers,
      },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      // leave as text (SSE, Prometheus)
    }
    return { status: res.status, headers: res.headers, body: parsed as T };
  }

  get<T = unknown>(path: string, headers?: Record<string, string>) {
    return this.request<T>('GET', path, undefined, headers);
  }
  post<T = unknown>(path: string, body?: unknown, headers?: Record<string, string>) {
    return this.request<T>('POST', path, body ?? {}, headers);
  }
  put<T = unknown>(path: string, body?: unknown, headers?: Record<string, string>) {
    return this.request<T>('PUT', path, body ?? {}, headers);
  }
  patch<T = unknown>(path: string, body?: unknown) {
    return this.request<T>('PATCH', path, body ?? {});
  }
  delete<T = unknown>(path: string) {
    return this.request<T>('DELETE', path);
  }
}

export interface Tenant {
  departmentId: string;
  userId: string;
  keyId: string;
  key: string;
  api: ApiClient;
  openai: OpenAI;
}

export interface TenantOptions {
  /** Reuse a department (to test sharing within it); default: a new one. */
  departmentId?: string;
  role?: 'user' | 'admin';
  /** Budgets set through the admin API right after creation (USD per `period`, default monthly). */
  userBudgetUsd?: number | string;
  departmentBudgetUsd?: number | string;
  period?: 'daily' | 'weekly' | 'monthly' | 'total';
}

export interface TestGateway {
  url: string;
  config: AppConfig;
  gateway: Gateway;
  stub: StubUpstream;
  database: TestDatabase;
  adminKey: string;
  admin: ApiClient;
  tenants: { create(options?: TenantOptions): Promise<Tenant> };
  openai(key: string): OpenAI;
  /** Stops the gateway; the stub and database too unless they were passed in. */
  close(): Promise<void>;
}

export interface TestGatewayOptions {
  db?: DbKind;
  /** Extra environment, as an operator would set it. */
  env?: Env;
  /** Share a stub between instances (its owner closes it). */
  stub?: StubUpstream;
  /** Run a second instance on the same PostgreSQL database (with the first one's `adminKey`, unless a rotation is meant). */
  postgresUrl?: string;
  adminKey?: string;
  clock?: Clock;
  /** Build the config from env alone, without the test's default upstream (for mock-mode tests). */
  mockUpstream?: boolean;
  /** Where the gateway logs (default: nowhere). */
  logger?: Logger;
}

/**
 * Boots the real gateway (same createGateway as main.ts) on a free loopback port, in front of a
 * real stub upstream over HTTP, on a real database. One call per test file, or two for the
 * multi-instance tests.
 */
export async function startTestGateway(options: TestGatewayOptions = {}): Promise<TestGateway> {
  const ownStub = options.stub === undefined;
  const stub = options.stub ?? (await startStubUpstream());
  const database = await createTestDatabase(options.db ?? 'pglite', options.postgresUrl);
  const adminKey = options.adminKey ?? `admin-test-${randomBytes(16).toString('hex')}`;
  const env: Env = {
    PORT: '0',
    HOST: '127.0.0.1',
    LOG_LEVEL: 'silent',
    ADMIN_API_KEY: adminKey,
    // As an operator sets it: GATEHOUSE_ROLE=api (and worker) refuse to start without it.
    ...(database.url === undefined ? {} : { DATABASE_URL: database.url }),
    ...(options.mockUpstream ? {} : { OPENROUTER_API_KEY: 'sk-test-upstream-secret', OPENROUTER_BASE_URL: stub.url }),
    ...options.env,
  };
  const config: AppConfig = { ...loadConfig(env), database: database.config };
  let gateway: Gateway;
  try {
    gateway = await createGateway(config, { logger: options.logger ?? createLogger('silent'), clock: options.clock, databaseTarget: database.target });
  } catch (error) {
    if (ownStub) await stub.close();
    if (!options.postgresUrl) await database.drop();
    throw error;
  }
  const url = gateway.url;
  const admin = new ApiClient(url, adminKey);
  const openai = (key: string) => new OpenAI({ apiKey: key, baseURL: `${url}/v1`, maxRetries: 0, timeout: 30_000 });
  let counter = 0;
  const tenants = {
    async create(opts: TenantOptions = {}): Promise<Tenant> {
      counter += 1;
      const tag = `${counter}-${randomBytes(3).toString('hex')}`;
      let departmentId = opts.departmentId;
      if (!departmentId) {
        const dept = await admin.post<{ id: string }>('/admin/departments', { name: `dept-${tag}` });
        if (dept.status !== 201 && dept.status !== 200) throw new Error(`department: ${dept.status} ${JSON.stringify(dept.body)}`);
        departmentId = dept.body.id;
      }
      const user = await admin.post<{ id: string }>('/admin/users', { name: `user-${tag}`, department_id: departmentId, role: opts.role ?? 'user' });
      if (user.status !== 201) throw new Error(`user: ${user.status} ${JSON.stringify(user.body)}`);
      const key = await admin.post<{ id: string; key: string }>('/admin/keys', { user_id: user.body.id, name: `key-${tag}` });
      if (key.status !== 201) throw new Error(`key: ${key.status} ${JSON.stringify(key.body)}`);
      const budgets = [
        ['users', user.body.id, opts.userBudgetUsd],
        ['departments', departmentId, opts.departmentBudgetUsd],
      ] as const;
      for (const [segment, id, limit] of budgets) {
        if (limit === undefined) continue;
        const set = await admin.put(`/admin/budgets/${segment}/${id}`, { limit_usd: limit, period: opts.period ?? 'monthly' });
        if (set.status !== 200) throw new Error(`budget: ${set.status} ${JSON.stringify(set.body)}`);
      }
      return { departmentId, userId: user.body.id, keyId: key.body.id, key: key.body.key, api: new ApiClient(url, key.body.key), openai: openai(key.body.key) };
    },
  };
  return {
    url,
    config,
    gateway,
    stub,
    database,
    adminKey,
    admin,
    tenants,
    openai,
    async close() {
      await gateway.close();
      if (ownStub) await stub.close();
      if (!options.postgresUrl) await database.drop();
    },
  };
}

export interface ProxiedGateway {
  /** The first instance: it owns the PostgreSQL database and the stub, and reaches both directly. */
  owner: TestGateway;
  /** Between `gw` and PostgreSQL: stop() or freeze() it to take the database away from `gw` alone. */
  proxy: TcpProxy;
  /** The second instance, on the same database through `proxy`, sharing the owner's stub and ADMIN_API_KEY, as replicas do. */
  gw: TestGateway;
  close(): Promise<void>;
}

/** Two instances on one PostgreSQL database, the second behind a TCP proxy: for tests of a database that goes away. */
export async function startGatewayBehindPostgresProxy(options: { env?: Env; logger?: Logger } = {}): Promise<ProxiedGateway> {
  const owner = await startTestGateway({ db: 'postgres' });
  const proxy = await startTcpProxy(owner.database.url ?? '');
  const gw = await startTestGateway({
    db: 'postgres',
    postgresUrl: proxy.url,
    stub: owner.stub,
    // Another ADMIN_API_KEY would be a rotation, and revoke the owner's (identity-bootstrap.service.ts).
    adminKey: owner.adminKey,
    env: options.env,
    logger: options.logger,
  });
  return {
    owner,
    proxy,
    gw,
    async close() {
      proxy.thaw();
      await gw.close();
      await proxy.stop();
      await owner.close();
    },
  };
}

export { pollUntil } from '../../src/core/testing/poll-until.js';

/** Posts a chat completion with `body` (a stream, as the caller writes it) and reads the whole SSE answer as its `data:` payloads. */
export async function postSse(gw: TestGateway, key: string, body: Record<string, unknown>): Promise<{ status: number; headers: Headers; events: string[]; text: string }> {
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  const events = text
    .split('\n\n')
    .filter((block) => block.startsWith('data: '))
    .map((block) => block.slice('data: '.length));
  return { status: res.status, headers: res.headers, events, text };
}

/**
 * A caller that leaves a chat completion midway: a JSON call once the upstream has it (the stub's
 * hit counter moved), a stream once its first bytes arrived (`afterFirstChunk`). Resolves when the
 * caller has hung up.
 */
export async function leaveMidway(
  gw: TestGateway,
  key: string,
  body: Record<string, unknown>,
  options: { afterFirstChunk: boolean; headers?: Record<string, string> },
): Promise<void> {
  const leaving = new AbortController();
  const hitsBefore = gw.stub.hits;
  const pending = fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...options.headers },
    body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: `leaving ${randomBytes(4).toString('hex')}` }], ...body }),
    signal: leaving.signal,
  });
  if (options.afterFirstChunk) await (await pending).body?.getReader().read();
  else await pollUntil(() => expect(gw.stub.hits).toBeGreaterThan(hitsBefore));
  leaving.abort();
  await pending.catch(() => undefined);
}


/**
 * A GATEHOUSE_ROLE=worker process (no HTTP server) on the api instance's PostgreSQL and Redis.
 * `env` should carry the api instance's REDIS_URL and REDIS_KEY_PREFIX so both share one queue.
 */
export async function startWorker(api: TestGateway, env: Env, logger: Logger = createLogger('silent')): Promise<WorkerProcess> {
  const config = loadConfig({
    LOG_LEVEL: logger.level,
    ADMIN_API_KEY: api.adminKey,
    DATABASE_URL: api.database.url,
    OPENROUTER_API_KEY: 'sk-test-upstream-secret',
    OPENROUTER_BASE_URL: api.stub.url,
    ...env,
    GATEHOUSE_ROLE: 'worker',
  });
  return createWorker({ ...config, database: api.config.database }, { logger });
}

/** Answers a chat completion the stub's script held back, with `content` and a usage of 5 + 2 tokens. */
export function answerHeld(res: ServerResponse, model: unknown, content = 'fine'): void {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(
    JSON.stringify({
      id: 'chatcmpl-held',
      object: 'chat.completion',
      created: 1,
      model,
      choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 },
    }),
  );
}
