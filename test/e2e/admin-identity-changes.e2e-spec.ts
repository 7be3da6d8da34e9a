import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IdentityService } from '../../src/identity/identity.service.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';

// Identity changes by several admins at once, and the last-admin guard's reach.

describe('PATCH of a department racing its DELETE (PostgreSQL)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ db: 'postgres' });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('a department disabled while a rename is in flight stays disabled, and its keys stay refused', async () => {
    const tenant = await gw.tenants.create();
    expect((await tenant.api.get('/v1/models')).status).toBe(200);

    // Holds the rename after it has read the department (at its name check, before it writes),
    // and lets a second admin's DELETE through meanwhile.
    const identity = gw.gateway.app.get<IdentityService, { assertDepartmentNameFree: (...args: unknown[]) => Promise<void> }>(IdentityService);
    const original = identity.assertDepartmentNameFree.bind(identity);
    let reached!: () => void;
    const atCheck = new Promise<void>((resolve) => (reached = resolve));
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    identity.assertDepartmentNameFree = async (...args) => {
      reached();
      await gate;
      return original(...args);
    };
    try {
      const patch = gw.admin.patch<{ name: string; disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`, { name: 'renamed-research' });
      await atCheck;
      const disabled = await gw.admin.delete<{ disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`);
      expect(disabled.status).toBe(200);
      expect(disabled.body.disabled_at).not.toBeNull();
      release();
      const renamed = await patch;
      expect(renamed.status).toBe(200);
      expect(renamed.body).toMatchObject({ name: 'renamed-research', disabled_at: disabled.body.disabled_at });
    } finally {
      identity.assertDepartmentNameFree = original;
    }

    const after = await gw.admin.get<{ disabled_at: string | null }>(`/admin/departments/${tenant.departmentId}`);
    expect(after.body.disabled_at, 'the concurrent PATCH enabled the department again').not.toBeNull();
    expect((await tenant.api.get('/v1/models')).status, "the disabled department's key works again").toBe(401);
  });
});
