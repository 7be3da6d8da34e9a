import type { ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatUsd } from '../../libs/money/src/index.js';
import { MAX_TOKENS, MODEL, storedBudget, worstCaseNanos } from '../integration/budget-support.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// A job's try refused 402 while an earlier try of the job still holds budget (its worker died
// before it settled) waits for that hold to go instead of failing. Request ids are the caller's to
// choose (x-request-id), so a live call of the same user can carry the name of the job's first try:
// that may make the job wait, but must never free the live call's hold or let the two together
// spend past the budget.

const ASYNC = { prefer: 'respond-async', 'cache-control': 'no-cache, no-store' };
const NO_RATE_LIMITS = { RATE_LIMIT_KEY_RPM: '1000000', RATE_LIMIT_USER_RPM: '1000000', RATE_LIMIT_DEPARTMENT_RPM: '1000000', RATE_LIMIT_ADMIN_RPM: '1000000' };
const JOB_TEXT = 'job!';
const LIVE_TEXT = 'live';

interface JobBody {
  id: string;
  status: string;
  attempts: number;
  error: { code: string } | null;
}

function answer(res: ServerResponse, model: unknown): void {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(
    JSON.stringify({
      id: 'chatcmpl-x',
      object: 'chat.completion',
      created: 1,
      model,
      choices: [{ index: 0, message: { role: 'assistant', content: 'w '.repeat(MAX_TOKENS).trim() }, finish_reason: 'length' }],
      // Every token the call was reserved for, priced from tokens (no usage.cost).
      usage: { prompt_tokens: 8, completion_tokens: MAX_TOKENS, total_tokens: 8 + MAX_TOKENS },
    }),
  );
}

describe("a job's second try and a live call of the same user that carries the first try's request id", () => {
  let gw: TestGateway;
  let worst: bigint;

  beforeAll(async () => {
    gw = await startTestGateway({ env: { ...NO_RATE_LIMITS, UPSTREAM_RETRY_ATTEMPTS: '1', JOBS_BACKOFF_MS: '1500', JOBS_BACKOFF_MAX_MS: '1500' } });
    worst = worstCaseNanos(gw, { messages: [{ role: 'user', content: JOB_TEXT }] }, [MODEL], MAX_TOKENS);
  });
  afterAll(async () => {
    await gw?.close();
  });

  // The control (any other request id) passes today; the case named like the job's first try fails.
  it.each([
    ['an unrelated request id', (_id: string) => `mine-${Date.now()}`],
    ["the job's first try's request id", (id: string) => `job-${id}-1`],
  ])('a live call carrying %s keeps its hold: the budget is never overspent', async (_name, requestId) => {
    gw.stub.reset();
    // Room for one call and a half: exact reservations (a lease of 32 does not fit), never two calls.
    const alice: Tenant = await gw.tenants.create({ userBudgetUsd: formatUsd((worst * 3n) / 2n), period: 'total' });
    let jobCalls = 0;
    let releaseLive: (() => void) | undefined;
    gw.stub.script = (_req, sent, res) => {
      const text = JSON.stringify(sent.messages);
      if (text.includes(JOB_TEXT)) {
        jobCalls += 1;
        if (jobCalls === 1) {
          // The first try fails transiently: the job waits for its second.
          res.writeHead(503, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ error: { message: 'overloaded', code: 503 } }));
        } else answer(res, sent.model);
        return true;
      }
      if (text.includes(LIVE_TEXT)) {
        releaseLive = () => answer(res, sent.model);
        return true;
      }
      return false;
    };

    const submit = await alice.api.post<JobBody>('/v1/chat/completions', { model: MODEL, max_tokens: MAX_TOKENS, messages: [{ role: 'user', content: JOB_TEXT }] }, ASYNC);
    expect(submit.status).toBe(202);
    const id = submit.body.id;
    await pollUntil(async () => {
      const job = (await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body;
      expect({ status: job.status, attempts: job.attempts }).toEqual({ status: 'queued', attempts: 1 });
    }, 10_000, 25);

    // While the job waits, the user's own sync call, named like the job's first try, holds its worst case.
    const live = alice.api.post<{ choices: unknown[] }>(
      '/v1/chat/completions',
      { model: MODEL, max_tokens: MAX_TOKENS, messages: [{ role: 'user', content: LIVE_TEXT }] },
      { 'cache-control': 'no-cache, no-store', 'x-request-id': requestId(id) },
    );
    await pollUntil(() => expect(releaseLive).toBeDefined(), 10_000, 10);

    // The second try: with the live call's hold in place, the budget cannot cover it. Refused, and
    // (only when the live call carries the first try's name) waiting for that hold to go.
    await pollUntil(async () => {
      const res = (await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body;
      expect(res.error?.code).toBe('budget_exceeded');
    }, 20_000, 50);
    releaseLive?.();
    expect((await live).status).toBe(200);
    // Once the live call is charged, the budget cannot cover the job either way.
    const job = await pollUntil(async () => {
      const res = (await alice.api.get<JobBody>(`/v1/jobs/${id}`)).body;
      expect(res.status).toBe('failed');
      return res;
    }, 20_000, 50);
    expect(job.error?.code).toBe('budget_exceeded');

    const budget = await storedBudget(gw, 'user', alice.userId);
    expect(budget.spent <= budget.limit, `spent ${budget.spent} of a ${budget.limit} limit`).toBe(true);
    // The upstream was asked for the job once (its first, failed try) and never beside the live call.
    expect(jobCalls).toBe(1);
  });
});
