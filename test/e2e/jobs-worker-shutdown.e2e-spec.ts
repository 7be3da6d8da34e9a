import type { ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATABASE_CONTENT } from '../../src/app.module.js';
import type { Env } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { openDatabase } from '../../src/database/data-source.js';
import { REDIS_URL } from '../support/databases.js';
import { answerHeld, pollUntil, startTestGateway, startWorker, type TestGateway } from '../support/gateway.js';
import { dropRedisKeys, uniqueRedisPrefix } from '../support/redis.js';

/**
 * A GATEHOUSE_ROLE=worker process stopped (SIGTERM: app.close()) while a job runs: the job
 * finishes (docs/operations.md "Graceful shutdown", Workers), and its result, audit row and ledger
 * row are stored by the writers' last flush before the database closes. The flush intervals are
 * far beyond the test, so only that last flush can store them.
 */
describe('a worker stopped with a job running (BullMQ, PostgreSQL)', () => {
  const env: Env = { REDIS_URL, REDIS_KEY_PREFIX: uniqueRedisPrefix('worker-shutdown'), AUDIT_FLUSH_MS: '60000', BUDGET_FLUSH_MS: '60000' };
  let api: TestGateway;
  beforeAll(async () => {
    api = await startTestGateway({ db: 'postgres', env: { ...env, GATEHOUSE_ROLE: 'api' } });
  }, 60_000);
  afterAll(async () => {
    await api?.close();
    await dropRedisKeys(env.REDIS_KEY_PREFIX as string);
  });

  it('lets the job finish, and stores its result, audit row and ledger row before closing', async () => {
    const alice = await api.tenants.create();
    // The upstream answers the job only once the worker is shutting down.
    let answer: (() => void) | undefined;
    api.stub.script = (_req, body, res: ServerResponse) => {
      answer = () => answerHeld(res, body.model, 'finished during the shutdown');
      return true;
    };
    const submit = await alice.api.post<{ id: string }>(
      '/v1/chat/completions',
      { model: 'auto', messages: [{ role: 'user', content: 'a job' }] },
      { prefer: 'respond-async' },
    );
    expect(submit.status).toBe(202);
    const jobId = submit.body.id;

    const lines: Array<{ context?: string; msg?: string }> = [];
    const logger = createLogger('info', {
      write: (line: string) =>
        void lines.push(
          ...line
            .split('\n')
            .filter(Boolean)
            .map((l) => JSON.parse(l) as { context?: string; msg?: string }),
        ),
    });
    const worker = await startWorker(api, env, logger);
    await pollUntil(() => expect(answer).toBeDefined(), 20_000);
    const closing = worker.close();
    // The shutdown has begun (its drain is over at once: a worker serves no requests) when the
    // upstream answers; the job workers' hook waits for the job.
    await pollUntil(() => expect(lines.some((l) => l.context === 'Shutdown' && l.msg === 'drained')).toBe(true));
    answer?.();
    await closing;

    const db = await openDatabase({ driver: 'postgres', url: api.database.url ?? '' }, DATABASE_CONTENT);
    try {
      const requestId = `job-${jobId}-1`;
      const jobs = await db.dataSource.query<Array<{ status: string }>>('SELECT status FROM jobs WHERE id = $1', [jobId]);
      expect(jobs).toEqual([{ status: 'completed' }]);
      const audit = await db.dataSource.query<Array<{ action: string; status: number }>>('SELECT action, status FROM audit_events WHERE request_id = $1', [
        requestId,
      ]);
      expect(audit).toEqual([{ action: 'completion', status: 200 }]);
      const ledger = await db.dataSource.query<Array<{ outcome: string }>>('SELECT outcome FROM usage_ledger WHERE request_id = $1', [requestId]);
      expect(ledger).toEqual([{ outcome: 'ok' }]);
    } finally {
      await db.close();
    }
  }, 90_000);
});
