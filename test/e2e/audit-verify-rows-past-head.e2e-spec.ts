import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditListDto, AuditVerifyDto } from '../../src/audit/admin/audit-admin.dto.js';
import { AuditService } from '../../src/audit/audit.service.js';
import { startTestGateway, type TestGateway } from '../support/gateway.js';

/**
 * The append-only trigger refuses UPDATE, DELETE and TRUNCATE, but not INSERT (the gateway needs
 * it), so anyone with the gateway's own database credentials can add a row without disabling
 * anything. `GET /admin/audit` lists such a row like any other, so `verify` must not call the
 * chain intact while it is there: once it walked only the rows up to the chain head it read
 * first, and a row past the head (linked to nothing: junk prev_hash and hash) passed until the
 * gateway's next flush, which on an idle gateway may be hours later.
 */
describe('a row inserted behind the writer (PGlite)', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startTestGateway({ env: { AUDIT_FLUSH_MS: '20' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('is not reported as part of a healthy chain by GET /admin/audit/verify', async () => {
    await gw.admin.post('/admin/departments', { name: 'before-the-forgery' });
    // Everything the gateway recorded is stored; nothing is on its way.
    const audit = gw.gateway.app.get(AuditService);
    expect(await audit.flush()).toBe(true);
    const clean = await gw.admin.get<AuditVerifyDto>('/admin/audit/verify');
    expect(clean.body).toMatchObject({ ok: true, first_break: null });

    const forged = await forgeRow(gw);

    // The admin API shows the row as the newest event...
    const listed = await gw.admin.get<AuditListDto>('/admin/audit?limit=1');
    expect(listed.body.data[0]?.seq).toBe(Number(forged.seq));

    // ...and verify must not call the chain that holds it intact.
    const verdict = await gw.admin.get<AuditVerifyDto>('/admin/audit/verify');
    expect(verdict.status).toBe(200);
    expect(verdict.body, 'a row outside the chain is listed, yet verify says the chain holds').toMatchObject({
      ok: false,
      first_break: Number(forged.seq),
    });
  });
});

describe('a row inserted behind the writer, verified over a range that holds it (PGlite)', () => {
  let gw: TestGateway;
  let forgedSeq: number;
  let startedAt: string;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { AUDIT_FLUSH_MS: '20' } });
    startedAt = new Date(Date.now() - 60_000).toISOString();
    await gw.admin.post('/admin/departments', { name: 'before-the-forgery' });
    expect(await gw.gateway.app.get(AuditService).flush()).toBe(true);
    const forged = await forgeRow(gw);
    forgedSeq = Number(forged.seq);
    const listed = await gw.admin.get<AuditListDto>('/admin/audit?limit=1');
    expect(listed.body.data[0]?.seq).toBe(forgedSeq);
    expect((await gw.admin.get<AuditVerifyDto>('/admin/audit/verify')).body).toMatchObject({ ok: false, first_break: forgedSeq });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('verify?from=1&to=<the forged seq> does not call that range intact', async () => {
    const verdict = await gw.admin.get<AuditVerifyDto>(`/admin/audit/verify?from=1&to=${forgedSeq}`);
    expect(verdict.status).toBe(200);
    expect(verdict.body, 'the range names a listed row outside the chain, yet verify says it holds').toMatchObject({ ok: false, first_break: forgedSeq });
  });

  it('verify over a date range that contains the forged row does not call it intact', async () => {
    const to = new Date(Date.now() + 60_000).toISOString();
    const verdict = await gw.admin.get<AuditVerifyDto>(`/admin/audit/verify?from=${encodeURIComponent(startedAt)}&to=${encodeURIComponent(to)}`);
    expect(verdict.status).toBe(200);
    expect(verdict.body).toMatchObject({ ok: false, first_break: forgedSeq });
  });
});

/** An ordinary INSERT with the gateway's own credentials: no trigger disabled, no superuser needed. */
async function forgeRow(gw: TestGateway): Promise<{ seq: string }> {
  const [forged] = await gw.gateway.app.get(DataSource).query<Array<{ seq: string }>>(
    `INSERT INTO audit_events (id, at, action, target_type, target_id, status, details, prev_hash, hash)
     VALUES ($1, now(), 'DELETE /admin/keys/:id', 'keys', 'someone-elses-key', 200, '{}'::jsonb, 'not-a-hash', 'not-a-hash')
     RETURNING seq`,
    [randomUUID()],
  );
  if (!forged) throw new Error('the INSERT returned no row');
  return forged;
}
