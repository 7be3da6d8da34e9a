import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DataSource } from 'typeorm';
import { RateLimitOverrides } from '../../src/rate-limit/rate-limit-overrides.service.js';
import { DB_KINDS } from '../support/databases.js';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Every instance polls the overrides table's stamp and reloads only when it changed. The stamp
// once held the latest change to the millisecond (a Date), where the database keeps microseconds:
// two PUTs by another instance within one millisecond, with a poll between them, left the second
// one unseen until some later change.
describe.each(DB_KINDS)('rate-limit overrides another instance changes (%s)', (db) => {
  let gw: TestGateway;
  let carol: Tenant;
  let overrides: RateLimitOverrides;
  let sql: DataSource;

  beforeAll(async () => {
    gw = await startTestGateway({ db });
    carol = await gw.tenants.create();
    overrides = gw.gateway.app.get(RateLimitOverrides);
    sql = gw.gateway.app.get(DataSource);
  });
  afterAll(async () => {
    await gw?.close();
  });

  /** Another instance's PUT, at a chosen moment. */
  const put = (rpm: number, at: string) =>
    sql.query(
      `INSERT INTO rate_limit_overrides (scope, subject_id, requests_per_minute, tokens_per_minute, updated_by, updated_at)
       VALUES ('user', $1, $2, NULL, 'other-instance', $3)
       ON CONFLICT (scope, subject_id) DO UPDATE SET requests_per_minute = EXCLUDED.requests_per_minute, updated_at = EXCLUDED.updated_at`,
      [carol.userId, rpm, at],
    );

  it('sees a second change made within the same millisecond as the first, after a poll between them', async () => {
    await put(5, '2030-01-01T00:00:00.000200Z');
    await overrides.refresh();
    expect(overrides.get('user', carol.userId)?.requestsPerMinute).toBe(5);
    await put(7, '2030-01-01T00:00:00.000700Z');
    await overrides.refresh();
    expect(overrides.get('user', carol.userId)?.requestsPerMinute).toBe(7);
  });
});
