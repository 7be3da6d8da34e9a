import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dataSourceOf } from '../integration/budget-support.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Before: no job row was ever deleted. A gateway that processes jobs deletes finished
// ones JOBS_RETENTION_HOURS (default 30 days) after they finished: at its start and every 10 min.

const ASYNC = { prefer: 'respond-async' };
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

interface JobBody {
  id: string;
  status: string;
}

describe('finished jobs past their retention (PostgreSQL, two instances)', () => {
  let first: TestGateway;
  let second: TestGateway | undefined;
  let alice: Tenant;

  beforeAll(async () => {
    first = await startTestGateway({ db: 'postgres', env: NO_RATE_LIMITS });
    alice = await first.tenants.create();
  });
  afterAll(async () => {
    await second?.close();
    await first?.close();
  });

  async function finishedJob(content: string): Promise<string> {
    const submit = await alice.api.post<JobBody>('/v1/chat/completions', { messages: [{ role: 'user', content }] }, ASYNC);
    expect(submit.status).toBe(202);
    await pollUntil(async () => expect((await alice.api.get<JobBody>(`/v1/jobs/${submit.body.id}`)).body.status).toBe('completed'));
    return submit.body.id;
  }

  it('are deleted by the next instance that starts (GET answers 404), while recent and dead-lettered ones stay', async () => {
    const old = await finishedJob('a month ago');
    const dead = await finishedJob('a month ago, in the dead-letter queue');
    const recent = await finishedJob('just now');
    // What 31 days passing would do to their rows.
    const db = dataSourceOf(first);
    await db.query(`UPDATE jobs SET created_at = created_at - interval '31 days', completed_at = completed_at - interval '31 days' WHERE id IN ($1, $2)`, [
      old,
      dead,
    ]);
    await db.query(`UPDATE jobs SET status = 'failed', dead_lettered = true, dead_lettered_at = completed_at WHERE id = $1`, [dead]);

    second = await startTestGateway({ db: 'postgres', postgresUrl: first.database.url, stub: first.stub, adminKey: first.adminKey, env: NO_RATE_LIMITS });
    await pollUntil(async () => expect((await alice.api.get(`/v1/jobs/${old}`)).status).toBe(404));
    expect((await alice.api.get<JobBody>(`/v1/jobs/${recent}`)).body).toMatchObject({ id: recent, status: 'completed' });
    expect((await first.admin.get<{ data: Array<{ id: string }> }>('/admin/queue/dead')).body.data.map((j) => j.id)).toContain(dead);
  });
});
