import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RateLimitOverrides } from '../../src/rate-limit/rate-limit-overrides.service.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Every instance polls the overrides table's stamp (row count, latest change) and reloads only when
// it changed. A change that took its timestamp before another change but committed after it, with a
// poll between the two commits, left the stamp as that poll saw it: the first change stayed unseen
// by the polling instance until some unrelated later change. A commit is slow for many reasons (a
// busy WAL flush, a synchronous replica); here a deferred trigger holds one change's commit 1.5 s.
describe('rate-limit overrides changed concurrently on one instance, seen by another', () => {
  let a: TestGateway;
  let b: TestGateway;
  let slow: Tenant;
  let fast: Tenant;
  let sql: pg.Client;

  beforeAll(async () => {
    a = await startTestGateway({ db: 'postgres' });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey });
    slow = await a.tenants.create();
    fast = await a.tenants.create();
    sql = new pg.Client({ connectionString: a.database.url });
    await sql.connect();
    await sql.query(`CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.requests_per_minute = 11 THEN PERFORM pg_sleep(1.5); END IF; RETURN NULL; END $$`);
    await sql.query(`CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON rate_limit_overrides
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()`);
  });
  afterAll(async () => {
    await sql?.end();
    await b?.close();
    await a?.close();
  });

  it('a change whose commit came after a later change and a poll between them is still seen', async () => {
    // Both overrides exist already, so the changes below leave the row count as it is.
    for (const t of [slow, fast]) expect((await a.admin.put(`/admin/rate-limits/users/${t.userId}`, { requests_per_minute: 50 })).status).toBe(200);
    const onB = b.gateway.app.get(RateLimitOverrides);
    await onB.refresh();
    await onB.refresh();
    expect(onB.get('user', slow.userId)?.requestsPerMinute).toBe(50);

    // Takes its timestamp now, commits 1.5 s later.
    const slowPut = a.admin.put(`/admin/rate-limits/users/${slow.userId}`, { requests_per_minute: 11 });
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect((await a.admin.put(`/admin/rate-limits/users/${fast.userId}`, { requests_per_minute: 22 })).status).toBe(200);
    await onB.refresh();
    await onB.refresh();
    expect(onB.get('user', fast.userId)?.requestsPerMinute).toBe(22);

    expect((await slowPut).status).toBe(200);
    await onB.refresh();
    await onB.refresh();
    expect(onB.get('user', slow.userId)?.requestsPerMinute).toBe(11);
    // B's snapshot is what decides its 429s.
    expect(onB.get('user', fast.userId)?.requestsPerMinute).toBe(22);
  });
});
