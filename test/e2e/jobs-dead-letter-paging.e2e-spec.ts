import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ApiClient, pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// The usual way through GET /admin/queue/dead is a "retry every dead job" loop: read a page,
// retry its jobs, ask for the page after the last id (`before`). While the upstream still
// refuses the gateway's key, each retried job is dead-lettered again at once (upstream_auth).
// A job keeps the place it first had in the list (dead_lettered_at, never moved), so the next
// page is the one after that place: had it moved to the top, the loop would see the jobs it
// already handled again and never reach the older ones (src/jobs/jobs.repository.ts, listDead).

interface Job {
  id: string;
  status: string;
  dead_lettered: boolean;
}
interface Page {
  data: Job[];
  has_more: boolean;
}
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };

async function deadLettered(client: ApiClient, id: string): Promise<Job> {
  return pollUntil(
    async () => {
      const res = await client.get<Job>(`/v1/jobs/${id}`);
      expect(res.body).toMatchObject({ status: 'failed', dead_lettered: true });
      return res.body;
    },
    20_000,
    20,
  );
}

describe('dead-letter paging while retried jobs are dead-lettered again', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...NO_RATE_LIMITS, UPSTREAM_RETRY_ATTEMPTS: '1' } });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('the page after a retried job is the page after its old place, not the top of the list again', async () => {
    // The upstream refuses the gateway's key: every try dead-letters at once (upstream_auth).
    gw.stub.configure({ status: 401 });
    const ids: string[] = [];
    for (let i = 0; i < 4; i += 1) {
      const res = await alice.api.post<Job>(
        '/v1/chat/completions',
        { model: 'auto', messages: [{ role: 'user', content: `dead ${i}` }] },
        { prefer: 'respond-async' },
      );
      expect(res.status).toBe(202);
      await deadLettered(alice.api, res.body.id);
      ids.push(res.body.id);
      // Distinct dead-letter moments, so the expected order does not rest on the id tie-break.
      await new Promise((r) => setTimeout(r, 5));
    }
    const name = (id: string) => `j${ids.indexOf(id)}`;
    const names = (page: Page) => page.data.map((j) => name(j.id));
    const [, , j2, j3] = ids as [string, string, string, string];

    const first = await gw.admin.get<Page>('/admin/queue/dead?limit=2');
    expect(names(first.body)).toEqual(['j3', 'j2']);
    expect(first.body.has_more).toBe(true);

    // The admin retries the page's jobs (the upstream still refuses: they are dead-lettered again)…
    for (const id of [j3, j2]) {
      expect((await gw.admin.post(`/admin/queue/dead/${id}/retry`)).status).toBe(202);
      await deadLettered(alice.api, id);
    }

    // …and asks for the next page after the last job it saw: the two older jobs, never seen yet.
    const second = await gw.admin.get<Page>(`/admin/queue/dead?limit=2&before=${j2}`);
    expect(second.status).toBe(200);
    expect(names(second.body)).toEqual(['j1', 'j0']);
    expect(second.body.has_more).toBe(false);

    // The jobs dead-lettered again are still in the list, at the place they first had: a next pass
    // from the top finds them, and sees every job once.
    const seen: string[] = [];
    let before = '';
    for (;;) {
      const page = await gw.admin.get<Page>(`/admin/queue/dead?limit=3${before ? `&before=${before}` : ''}`);
      expect(page.status).toBe(200);
      seen.push(...names(page.body));
      if (!page.body.has_more) break;
      before = page.body.data.at(-1)?.id ?? '';
    }
    expect(seen).toEqual(['j3', 'j2', 'j1', 'j0']);
  });
});
