import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/core/logger.js';
import { pollUntil, type ProxiedGateway, startGatewayBehindPostgresProxy, type TestGateway } from '../support/gateway.js';
import { rawRequest, sendAndLeave } from '../support/raw-http.js';
import type { TcpProxy } from '../support/redis.js';

interface LogLine {
  msg?: string;
  reqId?: string;
  status?: number;
}

/**
 * docs/operations.md "Logs": `request` is one per HTTP response the pipeline did not log, and
 * `completion` is one per pipeline call, *instead of* its `request` line.
 */
describe('access lines of requests whose caller left (PostgreSQL behind a freezable proxy)', () => {
  let proxied: ProxiedGateway;
  let owner: TestGateway;
  let proxy: TcpProxy;
  let gw: TestGateway;
  const written: string[] = [];
  const linesOf = (id: string): LogLine[] =>
    written
      .join('')
      .split('\n')
      .filter((l) => l.length > 0)
      .map((l) => JSON.parse(l) as LogLine)
      .filter((l) => l.reqId === id && (l.msg === 'request' || l.msg === 'completion'));

  beforeAll(async () => {
    proxied = await startGatewayBehindPostgresProxy({
      env: { AUDIT_FLUSH_MS: '20', LOG_LEVEL: 'info', DATABASE_REQUEST_TIMEOUT_MS: '1500', KEY_CACHE_MS: '2000' },
      logger: createLogger('info', { write: (line: string) => void written.push(line) }),
    });
    ({ owner, proxy, gw } = proxied);
  });
  afterAll(async () => {
    await proxied?.close();
  });

  it('a sync completion whose caller hung up during its key lookup has one line, not a request line and a completion line', async () => {
    const alice = await owner.tenants.create();
    const id = `left-sync-${randomBytes(6).toString('hex')}`;
    proxy.freeze();
    try {
      await sendAndLeave(gw.url, rawRequest('POST', '/v1/chat/completions', alice.key, id));
      await new Promise((resolve) => setTimeout(resolve, 300));
    } finally {
      proxy.thaw();
    }
    await pollUntil(() => expect(linesOf(id).some((l) => l.msg === 'completion')).toBe(true));
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(linesOf(id).map((l) => [l.msg, l.status])).toHaveLength(1);
  });
});
