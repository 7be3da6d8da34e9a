import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { AuditService } from '../../src/audit/audit.service.js';
import type { CompletionCall } from '../../src/completion/completion.types.js';
import { loadConfig } from '../../src/config/config.js';
import { ManualClock } from '../../src/core/clock.js';
import { type AppLogger, createLogger } from '../../src/core/logger.js';
import type { OpenedDatabase } from '../../src/database/data-source.js';
import { IdempotencyRepository } from '../../src/idempotency/idempotency.repository.js';
import { abandonedAfterMs, IDEMPOTENCY_WINDOW_MS, type IdempotencyClaim, IdempotencyService } from '../../src/idempotency/idempotency.service.js';
import type { StoredResponse } from '../../src/idempotency/idempotency.types.js';
import type { Principal } from '../../src/identity/principal.js';
import { DB_KINDS } from '../support/databases.js';
import { pollUntil } from '../support/gateway.js';
import { type JobsTestDatabase, openJobsTestDatabase } from '../support/jobs-database.js';

const CONFIG = loadConfig({});
const ABANDONED_MS = abandonedAfterMs(CONFIG);

/** A JSON answer as the chat door stores it; `\u0000` escapes and non-ASCII must come back byte for byte. */
const answer = (content: string): StoredResponse => ({
  kind: 'json',
  body: JSON.stringify({ id: 'chatcmpl-1', object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content } }] }),
  headers: { 'x-gateway-model': 'openai/gpt-4o-mini', 'x-gateway-cache': 'miss', 'x-gateway-route': 'task_type=general; rule=general; version=1' },
  model: 'openai/gpt-4o-mini',
  route: { requestedTaskType: 'general', ruleTaskType: 'general', version: 1 },
});

describe.each(DB_KINDS)('idempotency keys of sync calls on %s', (kind) => {
  let opened: JobsTestDatabase | undefined;
  let db: OpenedDatabase;
  let repo: IdempotencyRepository;
  let principal: Principal;
  let keys = 0;
  const claims: IdempotencyClaim[] = [];

  beforeAll(async () => {
    opened = await openJobsTestDatabase(kind, 'idempotency');
    db = opened.db;
    principal = opened.principal;
    repo = new IdempotencyRepository(db.dataSource);
  });
  afterAll(async () => {
    // Stops the heartbeats of claims a test left open.
    for (const claim of claims) await claim.release();
    await opened?.close();
  });

  function setup(owner: Principal = principal, clock = new ManualClock(Date.now())) {
    const audit = { recordCompletion: vi.fn() };
    const logger = { logger: createLogger('silent') } as AppLogger;
    const service = new IdempotencyService(repo, CONFIG, clock, audit as unknown as AuditService, logger);
    keys += 1;
    const key = `key-${keys}`;
    const call = (requestId: string) =>
      ({
        principal: owner,
        requestId,
        body: { messages: [{ role: 'user', content: 'hi' }] },
        taskType: undefined,
        door: 'chat',
        signal: new AbortController().signal,
        cacheControl: { read: true, write: true, ttlSeconds: undefined },
      }) as CompletionCall;
    /** Opens `key` and expects the claim. */
    const claim = async (requestId: string, hash = 'hash-a'): Promise<IdempotencyClaim> => {
      const result = await service.open(call(requestId), key, hash);
      expect(result.replay).toBeUndefined();
      const held = result.claim as IdempotencyClaim;
      claims.push(held);
      return held;
    };
    const row = async () =>
      (
        await db.dataSource.query<Array<{ state: string; request_id: string }>>(
          `SELECT state, request_id FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2`,
          [owner.userId, key],
        )
      )[0];
    return { service, clock, audit, key, call, claim, row };
  }

  it('claims a key once: a repeat while it runs is 409, another body 422, and once done the repeat gets the stored answer', async () => {
    const { service, key, call, claim, row } = setup();
    const first = await claim('req-1');
    expect(await row()).toEqual({ state: 'running', request_id: 'req-1' });

    await expect(service.open(call('req-2'), key, 'hash-a')).rejects.toMatchObject({
      code: 'request_in_progress',
      status: 409,
      param: 'idempotency-key',
      headers: { 'retry-after': '1' },
    });
    await expect(service.open(call('req-3'), key, 'hash-b')).rejects.toMatchObject({ code: 'idempotency_key_reused', status: 422, param: 'idempotency-key' });

    const stored = answer('caf\u00e9 \\u0000 \u{1F600} "quoted"');
    await first.finish(stored);
    expect(await row()).toEqual({ state: 'done', request_id: 'req-1' });
    const repeat = await service.open(call('req-4'), key, 'hash-a');
    expect(repeat.claim).toBeUndefined();
    expect(repeat.replay).toEqual(stored);
    await expect(service.open(call('req-5'), key, 'hash-b')).rejects.toMatchObject({ code: 'idempotency_key_reused' });
  });

  it('keeps a stream as the events it sent, and replays them as they were', async () => {
    const { service, key, call, claim } = setup();
    const events = [
      '{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
      '{"id":"c","choices":[{"index":0,"delta":{"content":"a\\nb"}}]}',
    ];
    const { headers, model, route } = answer('x');
    const stream: StoredResponse = { kind: 'sse', events, headers, model, route };
    await (await claim('req-1')).finish(stream);
    expect((await service.open(call('req-2'), key, 'hash-a')).replay).toEqual(stream);
  });

  it('lets exactly one of many concurrent first calls claim a key', async () => {
    const { service, key, call } = setup();
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => service.open(call(`req-${i}`), key, 'hash-a')));
    const won = results.filter((r) => r.status === 'fulfilled');
    expect(won).toHaveLength(1);
    const claim = (won[0] as PromiseFulfilledResult<{ claim?: IdempotencyClaim }>).value.claim;
    expect(claim).toBeDefined();
    claims.push(claim as IdempotencyClaim);
    for (const lost of results) {
      if (lost.status === 'rejected') expect(lost.reason).toMatchObject({ code: 'request_in_progress' });
    }
  });

  it('frees the key of a call that failed, so its retry runs; a released claim can no longer store', async () => {
    const { service, key, call, claim, row } = setup();
    const failed = await claim('req-1');
    await failed.release();
    expect(await row()).toBeUndefined();
    const retry = await claim('req-2', 'hash-b');
    expect(await row()).toEqual({ state: 'running', request_id: 'req-2' });
    // The failed call's late store (it never has one, but a bug must not clobber the retry) does nothing.
    await failed.finish(answer('late'));
    expect(await row()).toEqual({ state: 'running', request_id: 'req-2' });
    await retry.finish(answer('retried'));
    expect((await service.open(call('req-3'), key, 'hash-b')).replay).toEqual(answer('retried'));
  });

  it('takes over a running claim whose heartbeat stopped longer ago than a call can last, and only then', async () => {
    const { service, clock, key, call, claim, row } = setup();
    const dead = await claim('req-1');
    clock.advance(ABANDONED_MS - 1000);
    // A live call's heartbeat keeps its claim.
    expect(await repo.heartbeat(principal.userId, key, (dead as unknown as { claimId: string }).claimId, clock.now())).toBe(true);
    clock.advance(2000);
    await expect(service.open(call('req-2'), key, 'hash-a')).rejects.toMatchObject({ code: 'request_in_progress' });
    // Its process died: no more beats.
    clock.advance(ABANDONED_MS);
    const takeover = await claim('req-3');
    expect(await row()).toEqual({ state: 'running', request_id: 'req-3' });
    // The dead call, should it wake up, can neither store over the new claim nor free it.
    await dead.finish(answer('zombie'));
    expect(await row()).toEqual({ state: 'running', request_id: 'req-3' });
    await takeover.finish(answer('fresh'));
    expect((await service.open(call('req-4'), key, 'hash-a')).replay).toEqual(answer('fresh'));
  });

  it('forgets a done key after 24 hours: the next call runs, with another body too', async () => {
    const { service, clock, key, call, claim, row } = setup();
    await (await claim('req-1')).finish(answer('old'));
    clock.advance(IDEMPOTENCY_WINDOW_MS - 1000);
    expect((await service.open(call('req-2'), key, 'hash-a')).replay).toEqual(answer('old'));
    clock.advance(1000);
    await claim('req-3', 'hash-b');
    expect(await row()).toEqual({ state: 'running', request_id: 'req-3' });
  });

  it('deletes expired keys and long-abandoned claims off the request path, and nothing still in use', async () => {
    const owner = await openedPrincipal();
    const { service, clock, call } = setup(owner);
    const claim = async (key: string) => {
      const held = (await service.open(call(key), key, 'hash-a')).claim as IdempotencyClaim;
      claims.push(held);
      return held;
    };
    const keysLeft = async () =>
      (await db.dataSource.query<Array<{ k: string }>>(`SELECT idempotency_key AS k FROM idempotency_keys WHERE user_id = $1 ORDER BY 1`, [owner.userId])).map(
        (r) => r.k,
      );
    await (await claim('old-done')).finish(answer('old'));
    await claim('old-running');
    await claim('recent-running');
    expect(await keysLeft()).toEqual(['old-done', 'old-running', 'recent-running']);
    // A day later, one of the running calls still beats; the other died at once.
    clock.advance(IDEMPOTENCY_WINDOW_MS + ABANDONED_MS);
    await repo.heartbeat(owner.userId, 'recent-running', (claims.at(-1) as unknown as { claimId: string }).claimId, clock.now());
    clock.advance(1000);
    // The first claim in a while deletes what expired, in the background.
    await claim('new');
    await pollUntil(async () => expect(await keysLeft()).toEqual(['new', 'recent-running']));
    expect(await service.sweep()).toBe(0);
  });

  // PostgreSQL only: PGlite runs one statement at a time, so a sweep there never waits on a lock.
  if (kind === 'postgres')
    it('a sweep never deletes a claim that took over an expired row while the sweep waited for it', async () => {
      const key = `sweep-race-${++keys}`;
      const now = Date.now();
      const old = new Date(now - IDEMPOTENCY_WINDOW_MS - 60_000);
      await db.dataSource.query(
        `INSERT INTO idempotency_keys (user_id, idempotency_key, body_hash, state, claim_id, request_id, created_at, updated_at, response_meta, response_body)
       VALUES ($1, $2, 'hash-a', 'done', gen_random_uuid(), 'old', $3, $3, '{}', '{}')`,
        [principal.userId, key, old],
      );
      // A new call takes the expired row over, in a transaction not yet committed (the row locked)…
      const taker = db.dataSource.createQueryRunner();
      await taker.connect();
      await taker.startTransaction();
      try {
        await taker.query(
          `UPDATE idempotency_keys SET state = 'running', request_id = 'new', claim_id = gen_random_uuid(), created_at = $3, updated_at = $3
          WHERE user_id = $1 AND idempotency_key = $2`,
          [principal.userId, key, new Date(now)],
        );
        // …while a sweep that found the row expired waits for its lock.
        const swept = repo.deleteExpired({ expiredBefore: new Date(now - IDEMPOTENCY_WINDOW_MS), staleBefore: new Date(now - ABANDONED_MS) }, 1000);
        await new Promise((resolve) => setTimeout(resolve, 200));
        await taker.commitTransaction();
        await swept;
      } finally {
        await taker.release();
      }
      const rows = await db.dataSource.query<Array<{ state: string; request_id: string }>>(
        `SELECT state, request_id FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2`,
        [principal.userId, key],
      );
      expect(rows).toEqual([{ state: 'running', request_id: 'new' }]);
    });

  it('scopes keys per user', async () => {
    const { key, claim } = setup();
    await (await claim('alice')).finish(answer('alice'));
    const bob = await openedPrincipal();
    const other = setup(bob);
    const mine = await other.service.open(other.call('bob'), key, 'hash-b');
    expect(mine.claim).toBeDefined();
    claims.push(mine.claim as IdempotencyClaim);
  });

  /** Another user (keys are scoped per user; rows need no identity rows: no foreign keys). */
  async function openedPrincipal(): Promise<Principal> {
    const [row] = await db.dataSource.query<Array<{ id: string }>>(`SELECT gen_random_uuid()::text AS id`);
    return { ...principal, userId: row?.id ?? '' };
  }
});
