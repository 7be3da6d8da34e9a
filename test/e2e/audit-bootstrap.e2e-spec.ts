import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditEventDto, AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { createGateway, type Gateway } from '../../src/gateway.js';
import { hashApiKey, keyPrefix } from '../../src/identity/api-key.js';
import { pgliteTarget } from '../support/databases.js';
import { ApiClient, pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

interface KeyView {
  id: string;
  prefix: string;
}

async function created(admin: ApiClient, expected: number): Promise<AuditEventDto[]> {
  return pollUntil(async () => {
    const res = await admin.get<AuditListDto>('/admin/audit?action=bootstrap.create_key');
    expect(res.status).toBe(200);
    expect(res.body.data).toHaveLength(expected);
    return res.body.data;
  });
}

/** Everything recorded so far is stored: a change recorded after it is. */
async function settle(admin: ApiClient): Promise<void> {
  const marker = await admin.post<{ id: string }>('/admin/departments', { name: `marker-${randomBytes(4).toString('hex')}` });
  await pollUntil(async () => {
    const res = await admin.get<AuditListDto>('/admin/audit?action=POST%20/admin/departments');
    if (!res.body.data.some((e) => e.target_id === marker.body.id)) throw new Error('marker not stored yet');
  });
}

async function keyIdOf(admin: ApiClient, key: string): Promise<string | undefined> {
  const res = await admin.get<{ data: KeyView[] }>('/admin/keys');
  return res.body.data.find((k) => k.prefix === keyPrefix(key))?.id;
}

/** A key the bootstrap stores leaves a row, as one an admin creates does: by id and prefix, never the secret. */
describe('audit of the admin keys a start creates', () => {
  it('records the key generated on an embedded first start, once', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-audit-bootstrap-'));
    let gateway: Gateway | undefined;
    const start = async () => {
      const template = await pgliteTarget();
      return createGateway(
        { ...loadConfig({ PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'silent', AUDIT_FLUSH_MS: '20' }), database: { driver: 'pglite', dataDir } },
        { logger: createLogger('silent'), databaseTarget: { driver: 'pglite', dataDir, template: 'template' in template ? template.template : undefined } },
      );
    };
    try {
      gateway = await start();
      const key = gateway.generatedAdminKey ?? '';
      expect(key).toMatch(/^gh-/);
      const admin = new ApiClient(gateway.url, key);
      const [row] = await created(admin, 1);
      expect(row).toMatchObject({
        action: 'bootstrap.create_key',
        actor_user_id: null,
        target_type: 'keys',
        target_id: await keyIdOf(admin, key),
        details: { actor: 'system:bootstrap', prefix: keyPrefix(key) },
      });
      expect(JSON.stringify(row)).not.toContain(key);
      expect(JSON.stringify(row)).not.toContain(hashApiKey(key));

      // A restart generates no key, and records none.
      await gateway.close();
      gateway = await start();
      expect(gateway.generatedAdminKey).toBeUndefined();
      await settle(new ApiClient(gateway.url, key));
      expect(await created(new ApiClient(gateway.url, key), 1)).toEqual([row]);
    } finally {
      await gateway?.close();
      await rm(dataDir, { recursive: true, force: true });
    }
  });

  describe('ADMIN_API_KEY on PostgreSQL', () => {
    let first: TestGateway;
    const others: TestGateway[] = [];
    beforeAll(async () => {
      first = await startTestGateway({ db: 'postgres', env: { AUDIT_FLUSH_MS: '20' } });
    });
    afterAll(async () => {
      for (const gw of others.reverse()) await gw.close();
      await first?.close();
    });

    const replica = async (adminKey: string) => {
      const gw = await startTestGateway({ db: 'postgres', postgresUrl: first.database.url, stub: first.stub, adminKey, env: { AUDIT_FLUSH_MS: '20' } });
      others.push(gw);
      return gw;
    };

    it('records the key the first start stores, not again on a replica with the same secret, and a rotated-to key', async () => {
      const [row] = await created(first.admin, 1);
      expect(row).toMatchObject({
        action: 'bootstrap.create_key',
        target_type: 'keys',
        target_id: await keyIdOf(first.admin, first.adminKey),
        details: { actor: 'system:bootstrap', reason: 'ADMIN_API_KEY set', prefix: keyPrefix(first.adminKey) },
      });

      const same = await replica(first.adminKey);
      await settle(same.admin);
      expect(await created(first.admin, 1)).toEqual([row]);

      // Random from the first character: the prefix (10 characters) must tell the two keys apart.
      const next = `${randomBytes(16).toString('hex')}-admin`;
      const rotated = await replica(next);
      const rows = await created(rotated.admin, 2);
      expect(rows[0]).toMatchObject({ target_id: await keyIdOf(rotated.admin, next), details: { prefix: keyPrefix(next) } });
      expect(JSON.stringify(rows)).not.toContain(next);
      expect(JSON.stringify(rows)).not.toContain(first.adminKey);
    });
  });
});
