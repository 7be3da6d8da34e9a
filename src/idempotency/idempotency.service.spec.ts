import { describe, expect, it, vi } from 'vitest';
import type { AuditService } from '../audit/audit.service.js';
import type { CompletionCall } from '../completion/completion.types.js';
import { loadConfig } from '../config/config.js';
import { ManualClock } from '../core/clock.js';
import { type AppLogger, createLogger } from '../core/logger.js';
import type { IdempotencyRepository } from './idempotency.repository.js';
import { abandonedAfterMs, IdempotencyService } from './idempotency.service.js';

const CALL = {
  principal: { userId: 'u1', departmentId: 'd1', keyId: 'k1', keyPrefix: 'gh-k1', role: 'user', cacheScope: 'user', expiresAt: undefined },
  requestId: 'req-1',
  door: 'chat',
  body: { messages: [] },
} as unknown as CompletionCall;

function service(repo: Partial<IdempotencyRepository>, env: Record<string, string> = {}) {
  const audit = { recordCompletion: vi.fn() };
  const config = loadConfig(env);
  const logger = { logger: createLogger('silent') } as AppLogger;
  return { audit, idempotency: new IdempotencyService(repo as IdempotencyRepository, config, new ManualClock(), audit as unknown as AuditService, logger) };
}

describe('IdempotencyService', () => {
  it('counts a claim as abandoned only after everything a live call may wait for before its answer', () => {
    expect(abandonedAfterMs(loadConfig({}))).toBe(120_000 + 15_000 + 2 * 5000 + 30_000);
    expect(abandonedAfterMs(loadConfig({ UPSTREAM_DEADLINE_MS: '300000' }))).toBe(300_000 + 15_000 + 2 * 5000 + 30_000);
  });

  it('answers 503 unavailable when the database refuses the claim', async () => {
    const { idempotency } = service({ claim: () => Promise.reject(new Error('connection refused')) });
    await expect(idempotency.open(CALL, 'k', 'h')).rejects.toMatchObject({ code: 'unavailable', status: 503 });
  });

  it('answers 503 when the claim takes longer than DATABASE_REQUEST_TIMEOUT_MS, and frees the key if the claim lands later', async () => {
    let land!: (won: boolean) => void;
    const release = vi.fn(() => Promise.resolve(true));
    const { idempotency } = service({ claim: () => new Promise<boolean>((resolve) => (land = resolve)), release }, { DATABASE_REQUEST_TIMEOUT_MS: '100' });
    await expect(idempotency.open(CALL, 'k', 'h')).rejects.toMatchObject({ code: 'unavailable' });
    expect(release).not.toHaveBeenCalled();
    land(true);
    await vi.waitFor(() => expect(release).toHaveBeenCalledWith('u1', 'k', expect.any(String)));
  });

  it('audits a replay as the call it answers for: free, no attempt, its model and route', () => {
    const { idempotency, audit } = service({});
    const route = { requestedTaskType: 'code', ruleTaskType: 'code', version: 3 };
    idempotency.recordReplay(CALL, { kind: 'json', body: '{}', headers: { 'x-gateway-cache': 'miss' }, model: 'm', route });
    expect(audit.recordCompletion).toHaveBeenCalledWith(CALL, route, { model: 'm', cache: 'miss' }, [], 'idempotent_replay', 0n);
  });
});
