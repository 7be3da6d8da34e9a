import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RoutingVersionsRepository } from '../../src/routing/routing-versions.repository.js';
import { RoutingService } from '../../src/routing/routing.service.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface Table {
  version: number;
  default_task_type: string;
  rules: Array<{ task_type: string; model: string; fallbacks: string[] }>;
}

/**
 * GET /admin/routing "checks for a newer version first" (src/routing/README.md) and
 * GET /admin/routing/departments/{id} reads the newest too, so that a client's next PUT is not
 * stale. A poll already in flight when such a GET arrives may have read max(version) before
 * another instance's PUT committed: the GET must wait for a poll that starts after it asked.
 *
 * The in-flight poll is B's own (as its timer starts them), its answer read from PostgreSQL
 * before A's PUT and held 400 ms on its way back, as network latency or a wait for a pooled
 * connection would hold it. Nothing else on B is slowed.
 */
describe('routing read-after-write across instances while a poll is in flight', () => {
  let a: TestGateway;
  let b: TestGateway;
  let user: Tenant;

  beforeAll(async () => {
    a = await startTestGateway({ db: 'postgres' });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey });
    user = await a.tenants.create();
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  /** Starts B's poll (as its timer does), lets PostgreSQL answer it, and holds that answer until `release`. */
  async function slowPollOnB(): Promise<{ release: () => void; restore: () => void }> {
    const repo = b.gateway.app.get(RoutingVersionsRepository);
    const original = repo.latestVersion.bind(repo);
    let answered!: () => void;
    const dbAnswered = new Promise<void>((resolve) => (answered = resolve));
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let first = true;
    repo.latestVersion = async () => {
      const version = await original();
      if (first) {
        first = false;
        answered();
        await released;
      }
      return version;
    };
    void b.gateway.app.get(RoutingService).refresh();
    await dbAnswered;
    return {
      release,
      restore: () => {
        release();
        repo.latestVersion = original;
      },
    };
  }

  it('GET /admin/routing on B, sent after a PUT on A answered, shows the new version', async () => {
    // B is up to date before the test starts.
    const before = (await b.admin.get<Table>('/admin/routing')).body;
    const poll = await slowPollOnB();
    try {
      const put = await a.admin.put<Table>('/admin/routing', {
        version: before.version,
        default_task_type: before.default_task_type,
        rules: before.rules.map((r) => (r.task_type === 'general' ? { ...r, model: 'openai/gpt-4o', fallbacks: [] } : r)),
        comment: 'general → gpt-4o',
      });
      expect(put.status).toBe(200);
      const reading = b.admin.get<Table>('/admin/routing');
      setTimeout(poll.release, 400);
      const read = await reading;
      expect(read.status).toBe(200);
      expect(read.body.version).toBe(put.body.version);
    } finally {
      poll.restore();
    }
  });

  it("GET of a department's overrides on B right after A's change gives a version a PUT on B accepts", async () => {
    const dept = user.departmentId;
    const before = (await b.admin.get<{ version: number }>(`/admin/routing/departments/${dept}`)).body.version;
    const poll = await slowPollOnB();
    try {
      const put = await a.admin.put<{ version: number }>(`/admin/routing/departments/${dept}`, { version: before, overrides: [] });
      expect(put.status).toBe(200);
      const reading = b.admin.get<{ version: number }>(`/admin/routing/departments/${dept}`);
      setTimeout(poll.release, 400);
      const read = await reading;
      expect(read.body.version).toBe(put.body.version);
      // The version the GET gave is the one a client sends back: it must not be stale.
      const next = await b.admin.put(`/admin/routing/departments/${dept}`, { version: read.body.version, overrides: [] });
      expect(next.status).toBe(200);
    } finally {
      poll.restore();
    }
  });
});
