import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';

describe('two instances on one PostgreSQL', () => {
  let a: TestGateway;
  let b: TestGateway;

  beforeAll(async () => {
    a = await startTestGateway({ db: 'postgres' });
    b = await startTestGateway({ db: 'postgres', postgresUrl: a.database.url, stub: a.stub, adminKey: a.adminKey });
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  it('a key revoked through instance A stops working on instance B within 2 seconds', async () => {
    const alice = await a.tenants.create();
    const onB = (path: string) => fetch(`${b.url}${path}`, { headers: { authorization: `Bearer ${alice.key}` } });
    expect((await onB('/v1/models')).status).toBe(200);
    expect((await a.admin.delete(`/admin/keys/${alice.keyId}`)).status).toBe(200);
    await pollUntil(async () => {
      expect((await onB('/v1/models')).status).toBe(401);
    }, 2000);
  });
});
