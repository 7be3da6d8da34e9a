import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// A dead-lettered job can lack dead_lettered_at: one dead-lettered by an instance older than
// migration 1764400005200 (it does not know the column), during the rolling upgrade that ran it.
// Ordered by dead_lettered_at alone, such a job sat at the top of the "newest first" list whatever
// its age (PostgreSQL sorts NULL first), and `before=<its id>` was refused (400), stopping a walk
// through the list. Its completed_at is its place.

interface Job {
  id: string;
}
interface Page {
  data: Job[];
  has_more: boolean;
}

describe('dead-letter list with a job whose dead_lettered_at is NULL (dead-lettered by a pre-1764400005200 instance)', () => {
  let gw: TestGateway;
  let alice: Tenant;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { UPSTREAM_RETRY_ATTEMPTS: '1', RATE_LIMIT_KEY_RPM: '100000', RATE_LIMIT_USER_RPM: '100000', RATE_LIMIT_DEPARTMENT_RPM: '100000' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('lists it at its place (newest first) and pages past it', async () => {
    gw.stub.configure({ status: 401 });
    const ids: string[] = [];
    for (let i = 0; i < 3; i += 1) {
      const res = await alice.api.post<Job>('/v1/chat/completions', { model: 'auto', messages: [{ role: 'user', content: `legacy ${i}` }] }, { prefer: 'respond-async' });
      expect(res.status).toBe(202);
      await pollUntil(async () => expect((await alice.api.get<{ dead_lettered: boolean }>(`/v1/jobs/${res.body.id}`)).body.dead_lettered).toBe(true), 20_000, 20);
      ids.push(res.body.id);
      await new Promise((r) => setTimeout(r, 5));
    }
    // The oldest one was dead-lettered by an old instance: dead_lettered = true, dead_lettered_at never set.
    await gw.gateway.app.get(DataSource).query(`UPDATE jobs SET dead_lettered_at = NULL WHERE id = $1`, [ids[0]]);

    const seen: string[] = [];
    let before = '';
    for (let pages = 0; pages < 5; pages += 1) {
      const page = await gw.admin.get<Page>(`/admin/queue/dead?limit=1${before ? `&before=${before}` : ''}`);
      expect(page.status, JSON.stringify(page.body)).toBe(200);
      seen.push(...page.body.data.map((j) => `j${ids.indexOf(j.id)}`));
      if (!page.body.has_more) break;
      before = page.body.data.at(-1)?.id ?? '';
    }
    expect(seen).toEqual(['j2', 'j1', 'j0']);
  });
});
