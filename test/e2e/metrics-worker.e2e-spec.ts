import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppConfig, loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { createWorker, type WorkerProcess } from '../../src/gateway.js';
import { WorkerOpsServer } from '../../src/metrics/worker-ops-server.js';
import { createTestDatabase, REDIS_URL, type TestDatabase } from '../support/databases.js';

describe('GATEHOUSE_ROLE=worker: /metrics and /health/live without an API server', () => {
  let database: TestDatabase;
  let worker: WorkerProcess;
  let base: string;
  const token = `worker-metrics-${randomBytes(8).toString('hex')}`;

  beforeAll(async () => {
    database = await createTestDatabase('pglite');
    const env = {
      GATEHOUSE_ROLE: 'worker',
      REDIS_URL,
      // A worker needs one (loadConfig); the test database below replaces it.
      DATABASE_URL: 'postgres://placeholder.invalid/gatehouse',
      REDIS_KEY_PREFIX: `test-worker-ops-${randomBytes(4).toString('hex')}:`,
      PORT: '0',
      HOST: '127.0.0.1',
      LOG_LEVEL: 'silent',
      METRICS_TOKEN: token,
      // Set, so the worker does not generate (and print) a bootstrap admin key.
      ADMIN_API_KEY: `admin-${randomBytes(16).toString('hex')}`,
    };
    const config: AppConfig = { ...loadConfig(env), database: database.config };
    worker = await createWorker(config, { logger: createLogger('silent'), databaseTarget: database.target });
    base = `http://127.0.0.1:${worker.app.get(WorkerOpsServer).port}`;
  });
  afterAll(async () => {
    await worker.close();
    await database.drop();
  });

  it('answers liveness', async () => {
    const res = await fetch(`${base}/health/live`);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'ok' });
  });

  it('serves Prometheus text to the METRICS_TOKEN only', async () => {
    const refused = await fetch(`${base}/metrics`);
    expect(refused.status).toBe(401);
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe('invalid_api_key');
    const res = await fetch(`${base}/metrics`, { headers: { authorization: `Bearer ${token}` } });
    expect(res.status).toBe(200);
    expect(await res.text()).toContain('# TYPE gatehouse_streams_in_flight gauge');
  });

  it('answers nothing else', async () => {
    expect((await fetch(`${base}/v1/models`)).status).toBe(404);
  });
});
