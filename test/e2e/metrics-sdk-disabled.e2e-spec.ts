import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppConfig, loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { createWorker, type WorkerProcess } from '../../src/gateway.js';
import { WorkerOpsServer } from '../../src/metrics/worker-ops-server.js';
import { createTestDatabase, REDIS_URL, type TestDatabase } from '../support/databases.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';

// The SDK reads OTEL_SDK_DISABLED from the process once, when the first gateway starts it: this
// file must be the first to start one in its worker (vitest isolates files).
describe('OTEL_SDK_DISABLED=true: GET /metrics answers 503, not a 200 Prometheus would take for an empty target', () => {
  let gw: TestGateway;
  let database: TestDatabase;
  let worker: WorkerProcess;
  const logged: Array<Record<string, unknown>> = [];
  const previous = process.env['OTEL_SDK_DISABLED'];

  beforeAll(async () => {
    expect((globalThis as Record<symbol, unknown>)[Symbol.for('gatehouse.telemetry')], 'telemetry already started in this worker').toBeUndefined();
    process.env['OTEL_SDK_DISABLED'] = 'true';
    const logger = createLogger('warn', { write: (line: string) => void logged.push(JSON.parse(line) as Record<string, unknown>) });
    gw = await startTestGateway({ logger });
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
      ADMIN_API_KEY: `admin-${randomBytes(16).toString('hex')}`,
    };
    const config: AppConfig = { ...loadConfig(env), database: database.config };
    worker = await createWorker(config, { logger: createLogger('silent'), databaseTarget: database.target });
  });
  afterAll(async () => {
    await worker?.close();
    await database?.drop();
    await gw?.close();
    if (previous === undefined) delete process.env['OTEL_SDK_DISABLED'];
    else process.env['OTEL_SDK_DISABLED'] = previous;
  });

  it('on the API and on the worker, in the OpenAI envelope, logged once', async () => {
    const workerUrl = `http://127.0.0.1:${worker.app.get(WorkerOpsServer).port}`;
    for (const base of [gw.url, workerUrl, gw.url]) {
      const res = await fetch(`${base}/metrics`);
      expect(res.status).toBe(503);
      expect(res.headers.get('content-type')).toMatch(/^application\/json/);
      expect(await res.json()).toEqual({
        error: { message: 'Metrics are off: OTEL_SDK_DISABLED is set.', type: 'overloaded_error', param: null, code: 'unavailable' },
      });
    }
    // Three scrapes, one line: the process shares one exporter, so one log.
    expect(logged.filter((line) => String(line['msg']).startsWith('GET /metrics answers 503'))).toHaveLength(1);
  });
});
