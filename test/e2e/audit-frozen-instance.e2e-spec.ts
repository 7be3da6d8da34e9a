import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuditService } from '../../src/audit/audit.service.js';
import { pollUntil, startTestGateway, type TestGateway } from '../support/gateway.js';
import { startTcpProxy, type TcpProxy } from '../support/redis.js';

/**
 * Every instance's audit flush locks the chain head (`audit_chain_head ... FOR UPDATE`) until its
 * COMMIT. An instance that goes silent inside that transaction (paused, partitioned) must not stop
 * the fleet's audit trail: the server ends its idle transaction (idle_in_transaction_session_timeout,
 * src/database/data-source.ts), and the others write on. Without it the lock stayed until TCP gave
 * the session up, hours later, while every other instance's flush timed out and retried.
 *
 * The silent instance reaches PostgreSQL through a TCP relay the test freezes once the lock is
 * taken, just before the INSERT; the machine's PostgreSQL is never touched.
 */
/** The server's 10 s plus slack for a loaded machine, and under the waiting writer's 30 s statement_timeout. */
const OTHERS_WRITE_WITHIN_MS = 25_000;

describe('one instance frozen inside its audit transaction (PostgreSQL, two instances)', () => {
  let healthy: TestGateway;
  let proxy: TcpProxy;
  let frozen: TestGateway;
  let armed = false;

  beforeAll(async () => {
    healthy = await startTestGateway({ db: 'postgres', env: { AUDIT_FLUSH_MS: '50' } });
    proxy = await startTcpProxy(healthy.database.url ?? '', {
      rewriteFromClient: (text) => {
        // The lock is held (its SELECT ... FOR UPDATE answered); the INSERT is what never arrives.
        if (armed && text.includes('jsonb_array_elements($1::jsonb) WITH ORDINALITY')) {
          armed = false;
          proxy.freeze();
        }
        return text;
      },
    });
    // Flushes only when told to, so the test knows which flush freezes.
    frozen = await startTestGateway({
      db: 'postgres',
      postgresUrl: proxy.url,
      stub: healthy.stub,
      adminKey: healthy.adminKey,
      env: { AUDIT_FLUSH_MS: '60000' },
    });
  });
  afterAll(async () => {
    proxy?.thaw();
    await frozen?.close().catch(() => undefined);
    await proxy?.stop();
    await healthy?.close();
  });

  it('lets the other instances write audit rows within seconds, and loses none of its own events', async () => {
    const db = healthy.gateway.app.get(DataSource);
    const stored = async (action: string) =>
      (await db.query<Array<{ n: number }>>(`SELECT count(*)::int AS n FROM audit_events WHERE action = $1`, [action]))[0]?.n;

    const frozenAudit = frozen.gateway.app.get(AuditService);
    armed = true;
    frozenAudit.record({ action: 'test.frozen_instance', status: 200, details: {} });
    const frozenFlush = frozenAudit.flush();
    await pollUntil(() => expect(armed, 'the frozen instance reached its audit INSERT').toBe(false), 5000, 20);

    const healthyAudit = healthy.gateway.app.get(AuditService);
    healthyAudit.record({ action: 'test.healthy_instance', status: 200, details: {} });
    await pollUntil(
      async () => expect(await stored('test.healthy_instance'), `healthy instance's audit: ${JSON.stringify(healthyAudit.stats())}`).toBe(1),
      OTHERS_WRITE_WITHIN_MS,
      200,
    );

    // Back on the network, the instance writes the event of the transaction the server ended, once.
    proxy.thaw();
    await frozenFlush;
    await pollUntil(
      async () => {
        await frozenAudit.flush();
        expect(await stored('test.frozen_instance')).toBe(1);
      },
      15_000,
      200,
    );
  }, 60_000);
});
