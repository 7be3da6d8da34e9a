/**
 * Starting what the benchmark measures: the stub upstream, the floor proxies and the gateway in
 * its production configuration (PostgreSQL + Redis) or its embedded default (PGlite, in-memory
 * drivers), each as its own node process, plus a real department, user, key and budget.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { CONFIG_VARIABLES } from '../src/config/config.js';
import { BenchFailure } from './measure.js';
import { ENTRY, firstJsonLine, freePort, type NodeProcess, spawnNode, waitForHttp200 } from './processes.js';

export const PG_ADMIN_URL = process.env.BENCH_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
export const BENCH_REDIS_URL = process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379';
const BENCH_DATABASE = 'gatehouse_bench';

export interface Announced {
  url: string;
  port: number;
}

export interface StartedStub {
  proc: NodeProcess;
  /** Base URL with /v1, e.g. http://127.0.0.1:43123/v1 */
  url: string;
  origin: string;
}

export async function startStub(): Promise<StartedStub> {
  const proc = spawnNode('stub upstream', ENTRY.stub, ['--no-record', '--port', '0']);
  const { url } = await firstJsonLine<Announced>(proc);
  return { proc, url, origin: new URL(url).origin };
}

/** The floor (`floor`) or the parse floor (`parseFloor`) in front of the stub. */
export async function startFloor(stubOrigin: string, which: 'floor' | 'parseFloor' = 'floor'): Promise<{ proc: NodeProcess; origin: string }> {
  const args = ['--upstream', stubOrigin, '--port', '0', ...(which === 'parseFloor' ? ['--parse'] : [])];
  const proc = spawnNode(which === 'floor' ? 'floor proxy' : 'parse floor proxy', ENTRY.floor, args);
  const { url } = await firstJsonLine<Announced>(proc);
  return { proc, origin: url };
}

/**
 * Drops and recreates the bench's own database on the local PostgreSQL. `asyncCommit` sets
 * synchronous_commit=off on that database only: commits stop waiting for the WAL flush, which
 * separates what the gateway costs from what this machine's disk costs (BENCHMARKS.md).
 */
export async function recreateBenchDatabase(asyncCommit = false): Promise<string> {
  await withAdmin(async (client) => {
    await client.query(`DROP DATABASE IF EXISTS ${BENCH_DATABASE} WITH (FORCE)`);
    await client.query(`CREATE DATABASE ${BENCH_DATABASE}`);
    if (asyncCommit) await client.query(`ALTER DATABASE ${BENCH_DATABASE} SET synchronous_commit = off`);
  });
  const url = new URL(PG_ADMIN_URL);
  url.pathname = `/${BENCH_DATABASE}`;
  return url.toString();
}

/** Median latency of a one-row INSERT + COMMIT on the bench database (the disk's fsync, mostly). */
export async function probeCommitLatencyMs(databaseUrl: string, samples = 25): Promise<number> {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  try {
    // A real (not temporary) table: only WAL-logged writes wait for the flush.
    await client.query('CREATE TABLE IF NOT EXISTS bench_commit_probe_real (v int)');
    const times: number[] = [];
    for (let i = 0; i < samples; i++) {
      const t0 = performance.now();
      await client.query('INSERT INTO bench_commit_probe_real (v) VALUES ($1)', [i]);
      times.push(performance.now() - t0);
    }
    await client.query('DROP TABLE bench_commit_probe_real');
    times.sort((a, b) => a - b);
    return times[times.length >> 1] ?? Number.NaN;
  } finally {
    await client.end();
  }
}

export async function dropBenchDatabase(): Promise<void> {
  await withAdmin((client) => client.query(`DROP DATABASE IF EXISTS ${BENCH_DATABASE} WITH (FORCE)`));
}

async function withAdmin<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: PG_ADMIN_URL });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/**
 * The V8 memory settings the gateway ships with: `npm start`, `start:worker` (package.json) and the
 * image's CMD (docker/Dockerfile) pass exactly `memoryFlags(SHIPPED_MEMORY)` (bench/targets.spec.ts
 * checks), and the bench's gateway runs with them unless told otherwise. Why each is what it is:
 * bench/run.ts, next to the option that varies it.
 */
export const SHIPPED_MEMORY = Object.freeze({ semiSpaceMb: 16, heapGrowingPercent: 0, oldSpaceMb: 0, pretenuring: true });

export type GatewayFlavour = 'production' | 'embedded';

export interface GatewayOptions {
  name: string;
  flavour: GatewayFlavour;
  stubUrl: string;
  databaseUrl?: string;
  /** V8 young-generation cap in MB (--max-semi-space-size); 0 keeps V8's default. */
  semiSpaceMb: number;
  /** --heap-growing-percent (old generation growth past the live heap); 0 keeps V8's default. */
  heapGrowingPercent: number;
  /** --max-old-space-size in MB (also lowers V8's heap growing factor); 0 keeps V8's default. */
  oldSpaceMb: number;
  /** V8's allocation-site pretenuring (its default, as `npm start`); false passes `--no-allocation-site-pretenuring`. */
  pretenuring: boolean;
  /** Start under the in-process CPU profiler wrapper (IPC-controlled), for --profile. */
  profiled?: boolean;
  /** Another build's main.js (a saved copy of dist/), for before/after comparisons in one run. */
  entry?: string;
  /** Settings on top of the bench's own (a test's Redis key prefix, say). */
  env?: NodeJS.ProcessEnv;
}

export interface StartedGateway {
  name: string;
  flavour: GatewayFlavour;
  proc: NodeProcess;
  origin: string;
  adminKey: string;
  semiSpaceMb: number;
  nodeFlags: string[];
  cleanup(): Promise<void>;
}

/**
 * Limits far above what the bench can send: the bench measures what the rate-limit stage costs,
 * not what it refuses.
 */
const UNLIMITED_RPM = '10000000';

export async function startGateway(options: GatewayOptions): Promise<StartedGateway> {
  const port = await freePort();
  const adminKey = `bench-admin-${randomBytes(16).toString('hex')}`;
  let dataDir: string | undefined;
  // The caller's own gateway settings (a developer's DATABASE_URL, say) must not leak in.
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(CONFIG_VARIABLES)) delete env[name];
  Object.assign(env, {
    NODE_ENV: 'production',
    // As `npm start` and the image run it (docs/operations.md "Memory").
    MALLOC_ARENA_MAX: '2',
    PORT: String(port),
    HOST: '127.0.0.1',
    // No LOG_LEVEL: the default (info) writes two lines per request, and production pays for
    // them. Until session 16 the bench ran at warn, which left them out (BENCHMARKS.md).
    ADMIN_API_KEY: adminKey,
    OPENROUTER_API_KEY: 'bench',
    OPENROUTER_BASE_URL: options.stubUrl,
    RATE_LIMIT_KEY_RPM: UNLIMITED_RPM,
    RATE_LIMIT_USER_RPM: UNLIMITED_RPM,
    RATE_LIMIT_DEPARTMENT_RPM: UNLIMITED_RPM,
  });
  if (options.flavour === 'production') {
    if (!options.databaseUrl) throw new Error('production gateway needs a database URL');
    env.DATABASE_URL = options.databaseUrl;
    env.REDIS_URL = BENCH_REDIS_URL;
  } else {
    dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-bench-'));
    env.DATA_DIR = dataDir;
  }
  Object.assign(env, options.env);
  const nodeFlags = memoryFlags(options);
  const proc = spawnNode(options.name, options.profiled ? ENTRY.profiledGateway : (options.entry ?? ENTRY.gateway), [], {
    env,
    nodeFlags,
    ipc: options.profiled,
  });
  const origin = `http://127.0.0.1:${port}`;
  const cleanup = async (): Promise<void> => {
    await proc.stop();
    if (dataDir) await rm(dataDir, { recursive: true, force: true });
  };
  try {
    await waitForHttp200(proc, `${origin}/health/ready`, 90_000);
  } catch (error) {
    await cleanup();
    throw error;
  }
  return { name: options.name, flavour: options.flavour, proc, origin, adminKey, semiSpaceMb: options.semiSpaceMb, nodeFlags, cleanup };
}

/** The V8 memory flags a gateway runs with, as `npm start` passes them (package.json). */
export function memoryFlags(memory: { semiSpaceMb: number; heapGrowingPercent: number; oldSpaceMb: number; pretenuring: boolean }): string[] {
  const flags: string[] = [];
  if (memory.semiSpaceMb > 0) flags.push(`--max-semi-space-size=${memory.semiSpaceMb}`);
  if (memory.heapGrowingPercent > 0) flags.push(`--heap-growing-percent=${memory.heapGrowingPercent}`);
  if (memory.oldSpaceMb > 0) flags.push(`--max-old-space-size=${memory.oldSpaceMb}`);
  if (!memory.pretenuring) flags.push('--no-allocation-site-pretenuring');
  return flags;
}

export interface Tenant {
  key: string;
  userId: string;
  departmentId: string;
  /** Whether PUT /admin/budgets/users/{id} answered 200 (the budget stage is in the pipeline). */
  budgetActive: boolean;
  budgetStatus: number;
}

/** One department, one user, one key, and a budget large enough never to refuse a bench request. */
export async function provisionTenant(gatewayOrigin: string, adminKey: string): Promise<Tenant> {
  const admin = async <T>(method: string, path: string, body: unknown): Promise<{ status: number; body: T }> => {
    const res = await fetch(`${gatewayOrigin}${path}`, {
      method,
      headers: { authorization: `Bearer ${adminKey}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // keep the text for the error message
    }
    return { status: res.status, body: parsed as T };
  };
  const tag = randomBytes(3).toString('hex');
  const dept = await admin<{ id: string }>('POST', '/admin/departments', { name: `bench-${tag}` });
  if (dept.status !== 201 && dept.status !== 200) throw new BenchFailure(`creating the bench department: HTTP ${dept.status} ${JSON.stringify(dept.body)}`);
  const user = await admin<{ id: string }>('POST', '/admin/users', { name: `bench-user-${tag}`, department_id: dept.body.id, role: 'user' });
  if (user.status !== 201 && user.status !== 200) throw new BenchFailure(`creating the bench user: HTTP ${user.status} ${JSON.stringify(user.body)}`);
  const key = await admin<{ key: string }>('POST', '/admin/keys', { user_id: user.body.id, name: `bench-${tag}` });
  if (key.status !== 201 && key.status !== 200) throw new BenchFailure(`creating the bench key: HTTP ${key.status} ${JSON.stringify(key.body)}`);
  const budget = await admin('PUT', `/admin/budgets/users/${user.body.id}`, { limit_usd: 1_000_000, period: 'total' });
  return { key: key.body.key, userId: user.body.id, departmentId: dept.body.id, budgetActive: budget.status === 200, budgetStatus: budget.status };
}
