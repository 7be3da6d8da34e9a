import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ManualClock } from '../core/clock.js';
import { ERROR_TABLE } from '../core/errors.js';
import { createLogger } from '../core/logger.js';
import type { Principal } from '../identity/principal.js';
import { type AuditEvent, canonicalEvent, toJson } from './audit-event.js';
import type { AuditRepository } from './audit.repository.js';
import {
  type AuditOptions,
  AuditService,
  type CompletionAuditAttempt,
  type CompletionAuditCall,
  type CompletionAuditMeta,
  type CompletionAuditRoute,
} from './audit.service.js';

function service() {
  const stored: AuditEvent[] = [];
  const repository = { append: (events: readonly AuditEvent[]) => (stored.push(...events), Promise.resolve(events.length)) } as unknown as AuditRepository;
  const options: AuditOptions = { flushMs: 60_000, batchSize: 1000, maxBuffered: 10_000, maxBackoffMs: 1000 };
  return { audit: new AuditService(repository, new ManualClock(), { logger: createLogger('silent') }, options), stored };
}

type Args = [CompletionAuditCall, CompletionAuditRoute, CompletionAuditMeta | undefined, CompletionAuditAttempt[], string, bigint | undefined];

/** What recordCompletion stored before it built its details itself: the generic record() path. */
function viaRecord(audit: AuditService, [call, route, meta, attempts, outcome, costNanos]: Args): void {
  const last = attempts.at(-1);
  const endUser = call.body && 'user' in call.body ? call.body.user : undefined;
  audit.record({
    principal: call.principal,
    action: 'completion',
    targetType: 'model',
    targetId: meta?.model ?? last?.model ?? null,
    requestId: call.requestId,
    status: meta !== undefined ? 200 : Object.hasOwn(ERROR_TABLE, outcome) ? ERROR_TABLE[outcome as keyof typeof ERROR_TABLE].status : null,
    details: {
      door: call.door,
      task_type: route.requestedTaskType,
      rule: route.ruleTaskType,
      routing_version: route.version,
      model: meta?.model ?? null,
      cache: meta?.cache ?? null,
      attempts: attempts.map((a) => ({ model: a.model, ok: a.ok, status: a.status ?? null, failure: a.failure ?? null, ms: Math.round(a.latencyMs) })),
      prompt_tokens: last?.usage?.prompt_tokens ?? null,
      completion_tokens: last?.usage?.completion_tokens ?? null,
      outcome,
      cost_nanos: costNanos === undefined ? null : costNanos.toString(),
      end_user: typeof endUser === 'string' ? endUser : undefined,
    },
  });
}

const principal: Principal = {
  keyId: '6f1c1d0e-3c1a-4b1e-9a55-1d2f3e4a5b6c',
  keyPrefix: 'gh-abcdefg',
  userId: '6f1c1d0e-3c1a-4b1e-9a55-1d2f3e4a5b6d',
  departmentId: '6f1c1d0e-3c1a-4b1e-9a55-1d2f3e4a5b6e',
  role: 'user',
  cacheScope: 'user',
  expiresAt: undefined,
};
const nasty = `a\u0000b\uD800c${'é'.repeat(600)}😀`;
const attempt = (model: string, ok: boolean, extra: Partial<CompletionAuditAttempt> = {}): CompletionAuditAttempt => ({
  model,
  ok,
  status: ok ? 200 : 503,
  failure: ok ? undefined : 'http',
  latencyMs: 12.6,
  ...extra,
});

const cases: Record<string, Args> = {
  'a plain answer': [
    { requestId: 'r1', principal, door: 'chat', body: { messages: [] } },
    { requestedTaskType: 'code', ruleTaskType: 'code', version: 3 },
    { model: 'openai/gpt-4o-mini', cache: 'miss' },
    [attempt('openai/gpt-4o-mini', true, { usage: { prompt_tokens: 12, completion_tokens: 40 } })],
    'ok',
    123456n,
  ],
  'caller-supplied text that must be cleaned': [
    { requestId: `r2${nasty}`, principal: { ...principal, keyPrefix: nasty }, door: 'complete', body: { messages: [], user: nasty } },
    { requestedTaskType: nasty, ruleTaskType: 'general', version: 1 },
    { model: nasty, cache: 'bypass' },
    [
      attempt(nasty, false, { failure: nasty, status: undefined, latencyMs: NaN }),
      attempt(nasty, true, { usage: { prompt_tokens: Infinity, completion_tokens: -0 } }),
    ],
    'client_closed',
    undefined,
  ],
  'a failure before any answer, with a user label that is not text': [
    { requestId: 'r3', principal, door: 'job', body: { messages: [], user: 42 } },
    { requestedTaskType: 'poetry', ruleTaskType: 'general', version: 7 },
    undefined,
    Array.from({ length: 57 }, (_, i) => attempt(`m${i}`, false)),
    'upstream_timeout',
    0n,
  ],
  'no attempt at all': [
    { requestId: 'r4', principal, door: 'chat' },
    { requestedTaskType: 'code', ruleTaskType: 'code', version: 1 },
    undefined,
    [],
    'budget_exceeded',
    undefined,
  ],
};

describe('AuditService.recordCompletion', () => {
  it.each(Object.entries(cases))('stores and hashes exactly what the generic record() path stored: %s', async (_name, args) => {
    const fast = service();
    fast.audit.recordCompletion(...args);
    await fast.audit.flush();
    const generic = service();
    viaRecord(generic.audit, args);
    await generic.audit.flush();
    const [a] = fast.stored;
    const [b] = generic.stored;
    if (!a || !b) throw new Error('nothing stored');
    expect({ ...a, id: b.id }).toEqual(b);
    expect(canonicalEvent({ ...a, id: b.id })).toBe(canonicalEvent(b));
    // What the database receives for the jsonb column is the same document.
    expect(JSON.parse(JSON.stringify(a.details))).toEqual(JSON.parse(JSON.stringify(b.details)));
  });

  it('cleans what the caller sent: no NUL, no lone surrogate, bounded length', async () => {
    const { audit, stored } = service();
    audit.recordCompletion(...cases['caller-supplied text that must be cleaned']);
    await audit.flush();
    const details = stored[0]?.details ?? {};
    for (const key of ['end_user', 'task_type', 'model', 'key_prefix'] as const) {
      const text = details[key];
      expect(typeof text).toBe('string');
      expect(text).toBe(toJson(nasty));
      expect((text as string).includes('\u0000')).toBe(false);
      expect(text as string).not.toMatch(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])/);
      expect((text as string).length).toBeLessThanOrEqual(501);
    }
    expect(details.prompt_tokens).toBeNull();
  });
});

describe('AuditService shutdown', () => {
  it('does not report events lost while requests that are still draining keep recording', async () => {
    const logged: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        logged.push(chunk.toString());
        done();
      },
    });
    const stored: AuditEvent[] = [];
    const late: { audit?: AuditService } = {};
    let arrivals = 0;
    // Every INSERT takes a moment, and requests still finishing record meanwhile, as under load.
    const repository = {
      append: async (events: readonly AuditEvent[]) => {
        await new Promise((resolve) => setTimeout(resolve, 2));
        if (arrivals < 20) {
          arrivals += 1;
          late.audit?.record({ action: 'completion', details: { n: arrivals } });
        }
        stored.push(...events);
        return events.length;
      },
    } as unknown as AuditRepository;
    const options: AuditOptions = { flushMs: 60_000, batchSize: 1000, maxBuffered: 10_000, maxBackoffMs: 1000 };
    const audit = new AuditService(repository, new ManualClock(), { logger: createLogger('info', sink) }, options);
    late.audit = audit;
    audit.record({ action: 'completion', details: { n: 0 } });

    audit.beforeApplicationShutdown();
    await audit.onApplicationShutdown();

    expect(logged.filter((line) => line.includes('LOST'))).toEqual([]);
    expect(stored).toHaveLength(21);
  });
});

describe('AuditService shutdown, database not answering', () => {
  function silentService(append: () => Promise<number>) {
    const logged: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        logged.push(chunk.toString());
        done();
      },
    });
    const repository = { append } as unknown as AuditRepository;
    const options: AuditOptions = { flushMs: 60_000, batchSize: 1000, maxBuffered: 10_000, maxBackoffMs: 1000 };
    return { audit: new AuditService(repository, new ManualClock(), { logger: createLogger('info', sink) }, options), logged };
  }

  it('does not hold up the hooks after it while a flush waits for the database', async () => {
    const { audit } = silentService(() => new Promise<number>(() => undefined));
    audit.record({ action: 'completion' });
    // Nest awaits each module's hook before the next one's (the HTTP server's close, the writers' last flush).
    const hook = Promise.resolve(audit.beforeApplicationShutdown()).then(() => 'returned');
    const waited = new Promise((resolve) => setTimeout(() => resolve('still waiting'), 200));
    expect(await Promise.race([hook, waited])).toBe('returned');
  });

  it('logs an event recorded after the last flush as lost', async () => {
    const { audit, logged } = silentService(async () => Promise.resolve(0));
    await audit.onApplicationShutdown();
    audit.record({ action: 'completion', requestId: 'too-late' });
    const lost = logged.filter((line) => line.includes('AUDIT EVENTS LOST'));
    expect(lost).toHaveLength(1);
    expect(lost[0]).toContain('too-late');
  });
});
