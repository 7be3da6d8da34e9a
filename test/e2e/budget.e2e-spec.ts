import OpenAI from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { formatUsd, parseUsd, tokensCost } from '../../libs/money/src/index.js';
import { stubCost } from '../../libs/stub-upstream/src/index.js';
import { ledgerRows, storedBudget, worstCaseNanos } from '../integration/budget-support.js';
import { leaveMidway, pollUntil, postSse, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// Budgets, costs and spend as a client and an admin see them over HTTP: the stub upstream
// reporting usage.cost (OpenRouter) and not reporting it (priced from the pricing table).

const MINI = 'openai/gpt-4o-mini';
const SONNET = 'anthropic/claude-3.5-sonnet';
const FRESH = { 'cache-control': 'no-cache, no-store' };
const FAST_RETRIES = { UPSTREAM_RETRY_BASE_MS: '1', UPSTREAM_RETRY_MAX_DELAY_MS: '5', UPSTREAM_RETRY_ATTEMPTS: '2' };

interface ErrorBody {
  error: { code: string; param: string | null; message: string; type: string; resets_at?: string | null };
}
interface BudgetView {
  scope: string;
  id: string;
  limit_usd: number | null;
  period: string | null;
  spent_usd: number | null;
  reserved_usd: number | null;
  remaining_usd: number | null;
  period_start: string | null;
  resets_at: string | null;
}
interface Completion {
  model: string;
  usage: { prompt_tokens: number; completion_tokens: number };
}
interface PriceView {
  model: string;
  prompt: string;
  completion: string;
  source: string;
}

describe('budgets, costs and spend over HTTP (stub upstream, PGlite)', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ env: FAST_RETRIES });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });
  beforeEach(() => {
    gw.stub.reset();
  });

  const chat = (t: Tenant, extra: Record<string, unknown> = {}) =>
    t.api.post<Completion & ErrorBody>(
      '/v1/chat/completions',
      { model: MINI, messages: [{ role: 'user', content: 'price this please' }], max_tokens: 50, ...extra },
      FRESH,
    );

  describe('admin budget API', () => {
    it('sets and reads user and department budgets in the API.md shape', async () => {
      const put = await gw.admin.put<BudgetView>(`/admin/budgets/users/${alice.userId}`, { limit_usd: 50, period: 'monthly' });
      expect(put.status).toBe(200);
      const monthStart = new Date(Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), 1)).toISOString();
      expect(put.body).toEqual({
        scope: 'user',
        id: alice.userId,
        limit_usd: 50,
        period: 'monthly',
        spent_usd: 0,
        reserved_usd: 0,
        remaining_usd: 50,
        period_start: monthStart,
        resets_at: new Date(Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth() + 1, 1)).toISOString(),
      });
      expect((await gw.admin.get<BudgetView>(`/admin/budgets/users/${alice.userId}`)).body).toEqual(put.body);

      const dept = await gw.admin.put<BudgetView>(`/admin/budgets/departments/${alice.departmentId}`, { limit_usd: '0.25', period: 'total' });
      expect(dept.status).toBe(200);
      expect(dept.body).toMatchObject({ scope: 'department', id: alice.departmentId, limit_usd: 0.25, period: 'total', remaining_usd: 0.25, resets_at: null });
      expect((await gw.admin.get<BudgetView>(`/admin/budgets/departments/${alice.departmentId}`)).body).toEqual(dept.body);

      // No budget = unlimited, said explicitly.
      const bob = await gw.tenants.create();
      expect((await gw.admin.get<BudgetView>(`/admin/budgets/users/${bob.userId}`)).body).toMatchObject({
        scope: 'user',
        id: bob.userId,
        limit_usd: null,
        period: null,
      });

      // Removing a budget makes the scope unlimited again.
      const removed = await gw.admin.delete<BudgetView>(`/admin/budgets/departments/${alice.departmentId}`);
      expect(removed.status).toBe(200);
      expect(removed.body.limit_usd).toBeNull();
      expect((await gw.admin.delete<ErrorBody>(`/admin/budgets/departments/${alice.departmentId}`)).status).toBe(404);
    });

    it.each([
      [{ period: 'daily' }, 'missing_field', 'limit_usd'],
      [{ limit_usd: -1, period: 'daily' }, 'invalid_value', 'limit_usd'],
      [{ limit_usd: 'ten', period: 'daily' }, 'invalid_value', 'limit_usd'],
      [{ limit_usd: true, period: 'daily' }, 'invalid_value', 'limit_usd'],
      [{ limit_usd: '-0.5', period: 'daily' }, 'invalid_value', 'limit_usd'],
      [{ limit_usd: 1e12, period: 'daily' }, 'invalid_value', 'limit_usd'],
      [{ limit_usd: 5 }, 'missing_field', 'period'],
      [{ limit_usd: 5, period: 'yearly' }, 'invalid_value', 'period'],
      [{ limit_usd: 5, period: 7 }, 'invalid_value', 'period'],
    ])('rejects %j with 400 naming the field', async (body, code, param) => {
      const res = await gw.admin.put<ErrorBody>(`/admin/budgets/users/${alice.userId}`, body);
      expect(res.status).toBe(400);
      expect(res.body.error).toMatchObject({ code, param, type: 'invalid_request_error' });
    });

    it('answers 404 for unknown users and departments, 403 for a non-admin key', async () => {
      const unknown = '00000000-0000-4000-8000-000000000000';
      for (const path of [`/admin/budgets/users/${unknown}`, `/admin/budgets/departments/${unknown}`, '/admin/budgets/users/not-a-uuid']) {
        const put = await gw.admin.put<ErrorBody>(path, { limit_usd: 5, period: 'daily' });
        expect(put.status).toBe(404);
        expect(put.body.error.code).toBe('not_found');
        expect((await gw.admin.get(path)).status).toBe(404);
      }
      const forbidden = await alice.api.put<ErrorBody>(`/admin/budgets/users/${alice.userId}`, { limit_usd: 1000, period: 'daily' });
      expect(forbidden.status).toBe(403);
    });

    it('keeps spent when only the limit changes, and recounts from the ledger when the period changes', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1, period: 'monthly' });
      expect((await chat(t)).status).toBe(200);
      const spent = (await storedBudget(gw, 'user', t.userId)).spent;
      expect(spent).toBeGreaterThan(0n);
      const raised = await gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: 2, period: 'monthly' });
      expect(raised.body).toMatchObject({ limit_usd: 2, spent_usd: Number(formatUsd(spent)) });
      // The same spend counts for today as well: a daily budget set now starts from the ledger.
      const daily = await gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: 2, period: 'daily' });
      expect(daily.body).toMatchObject({ period: 'daily', spent_usd: Number(formatUsd(spent)) });
      // A total budget counts from when it was set.
      const total = await gw.admin.put<BudgetView>(`/admin/budgets/users/${t.userId}`, { limit_usd: 2, period: 'total' });
      expect(total.body).toMatchObject({ period: 'total', spent_usd: 0, resets_at: null });
    });
  });

  describe('what a call costs', () => {
    it('charges the upstream-reported usage.cost, exactly to the nano-dollar, on every door', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const res = await chat(t);
      expect(res.status).toBe(200);
      const expected = parseUsd(stubCost(MINI, res.body.usage.prompt_tokens, res.body.usage.completion_tokens));
      expect(expected).toBeDefined();
      expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(expected ?? 0n));
      const [row] = await ledgerRows(gw, 'user', t.userId);
      expect(row).toMatchObject({
        model: MINI,
        cost_source: 'upstream',
        outcome: 'ok',
        status: 200,
        door: 'chat',
        key_id: t.keyId,
        department_id: t.departmentId,
      });
      expect(BigInt(row?.cost_nanos ?? -1)).toBe(expected);
      expect((await gw.admin.get<BudgetView>(`/admin/budgets/users/${t.userId}`)).body.spent_usd).toBe(Number(formatUsd(expected ?? 0n)));

      const simple = await t.api.post<{ cost_usd: number; tokens: number }>(
        '/v1/complete',
        { prompt: 'price this please', model: MINI, max_tokens: 50 },
        FRESH,
      );
      expect(simple.status).toBe(200);
      expect(simple.body.cost_usd).toBe(Number(simple.headers.get('x-gateway-cost-usd')));
      expect(simple.body.cost_usd).toBeGreaterThan(0);
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows.map((r) => r.door)).toEqual(['chat', 'complete']);
    });

    it('prices from the table when the upstream reports no cost, with prices refreshed from its /models', async () => {
      const prices = await pollUntil(async () => {
        const list = await gw.admin.get<{ data: PriceView[]; upstream_refreshed_at: string | null; fallback: PriceView }>('/admin/pricing');
        expect(list.body.upstream_refreshed_at).not.toBeNull();
        return list.body;
      });
      expect(prices.data.find((p) => p.model === MINI)).toEqual(expect.objectContaining({ prompt: '0.00000015', completion: '0.0000006', source: 'upstream' }));
      // Known only to the static file (the stub does not list it).
      expect(prices.data.find((p) => p.model === 'google/gemini-flash-1.5')?.source).toBe('static');
      expect(prices.fallback).toMatchObject({ source: 'fallback', prompt: '0.000015', completion: '0.000075' });

      gw.stub.configure({ omitCost: true });
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const res = await chat(t);
      expect(res.status).toBe(200);
      const { prompt_tokens: p, completion_tokens: c } = res.body.usage;
      const expected = tokensCost(p, '0.00000015') + tokensCost(c, '0.0000006');
      expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(expected));
      const [row] = await ledgerRows(gw, 'user', t.userId);
      expect(row).toMatchObject({ cost_source: 'pricing_table', prompt_tokens: p, completion_tokens: c });
      expect(BigInt(row?.cost_nanos ?? -1)).toBe(expected);
    });

    it('charges a usage.cost sent as decimal text exactly, and prices from the table a cost that is no amount', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const usage = { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 };
      const table = formatUsd(tokensCost(10, '0.00000015') + tokensCost(5, '0.0000006'));
      const charged = async (cost: unknown) => {
        gw.stub.script = (_req, sent, res) => {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end(
            JSON.stringify({
              id: 'chatcmpl-cost',
              object: 'chat.completion',
              created: 1,
              model: sent.model,
              choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
              usage: { ...usage, cost },
            }),
          );
          return true;
        };
        const res = await chat(t);
        expect(res.status).toBe(200);
        const row = (await ledgerRows(gw, 'user', t.userId)).at(-1);
        return [res.headers.get('x-gateway-cost-usd'), row?.cost_source];
      };
      expect(await charged('0.000001234')).toEqual(['0.000001234', 'upstream']);
      expect(await charged(0.0000012345678)).toEqual(['0.000001235', 'upstream']);
      // Number() reads '' as 0, which made the call free, and '0x1F' as $31.
      for (const cost of ['', '  ', '0x1F', 'NaN', -0.5, null]) expect([cost, ...(await charged(cost))]).toEqual([cost, table, 'pricing_table']);
    });

    it('lets an admin override a price, which wins until removed', async () => {
      gw.stub.configure({ omitCost: true });
      const set = await gw.admin.put<PriceView>(`/admin/pricing/${MINI}`, { prompt: '0.000001', completion: 2e-6 });
      expect(set.status).toBe(200);
      expect(set.body).toMatchObject({ model: MINI, prompt: '0.000001', completion: '0.000002', source: 'override' });
      expect((await gw.admin.get<PriceView>(`/admin/pricing/${encodeURIComponent(MINI)}`)).body.source).toBe('override');

      const t = await gw.tenants.create();
      const res = await chat(t);
      const { prompt_tokens: p, completion_tokens: c } = res.body.usage;
      expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(tokensCost(p, '0.000001') + tokensCost(c, '0.000002')));

      const removed = await gw.admin.delete<PriceView>(`/admin/pricing/${MINI}`);
      expect(removed.body).toMatchObject({ model: MINI, source: 'upstream', prompt: '0.00000015' });
      const after = await chat(t);
      expect(after.headers.get('x-gateway-cost-usd')).toBe(
        formatUsd(tokensCost(after.body.usage.prompt_tokens, '0.00000015') + tokensCost(after.body.usage.completion_tokens, '0.0000006')),
      );

      expect((await gw.admin.delete<ErrorBody>(`/admin/pricing/${MINI}`)).status).toBe(404);
      for (const [body, param] of [
        [{ prompt: '-1', completion: '0.1' }, 'prompt'],
        [{ prompt: '0.1' }, 'completion'],
        [{ prompt: 'free', completion: '0.1' }, 'prompt'],
      ] as const) {
        const bad = await gw.admin.put<ErrorBody>(`/admin/pricing/${MINI}`, body);
        expect(bad.status).toBe(400);
        expect(bad.body.error.param).toBe(param);
      }
      expect((await alice.api.put(`/admin/pricing/${MINI}`, { prompt: '0', completion: '0' })).status).toBe(403);
    });

    it('names the model asked about when it is priced at the fallback (GET, and DELETE of its only override)', async () => {
      const unpriced = `acme/unpriced-${Date.now()}`;
      expect((await gw.admin.get<PriceView>(`/admin/pricing/${unpriced}`)).body).toMatchObject({ model: unpriced, source: 'fallback' });
      expect((await gw.admin.put<PriceView>(`/admin/pricing/${unpriced}`, { prompt: '0.000001', completion: '0.000002' })).status).toBe(200);
      expect((await gw.admin.delete<PriceView>(`/admin/pricing/${unpriced}`)).body).toMatchObject({ model: unpriced, source: 'fallback' });
    });

    it('reserves an unpriced model at the conservative fallback price, and charges it at that price', async () => {
      const mystery = 'acme/mystery-1';
      // Enough for the cheap model's worst case, far from enough for the fallback price's.
      const t = await gw.tenants.create({ userBudgetUsd: '0.001' });
      expect((await chat(t)).status).toBe(200);
      const refused = await chat(t, { model: mystery, max_tokens: 100 });
      expect(refused.status).toBe(402);
      expect(refused.body.error).toMatchObject({ code: 'budget_exceeded', param: 'user' });

      gw.stub.configure({ omitCost: true });
      const rich = await gw.tenants.create({ userBudgetUsd: 1 });
      const res = await chat(rich, { model: mystery, max_tokens: 10 });
      expect(res.status).toBe(200);
      const { prompt_tokens: p, completion_tokens: c } = res.body.usage;
      expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(tokensCost(p, '0.000015') + tokensCost(c, '0.000075')));
      expect((await ledgerRows(gw, 'user', rich.userId))[0]?.cost_source).toBe('fallback_price');
    });

    it('reserves for the most expensive model of the fallback chain, and writes a free ledger row per failed attempt', async () => {
      const body = { messages: [{ role: 'user', content: 'fix my bug' }] };
      const sonnetWorst = worstCaseNanos(gw, body, [SONNET, MINI], 1024);
      const miniWorst = worstCaseNanos(gw, body, [MINI], 1024);
      expect(sonnetWorst).toBeGreaterThan(miniWorst);
      // Enough for the fallback model alone, not for the primary: refused, even though the primary is down.
      const tight = await gw.tenants.create({ userBudgetUsd: formatUsd(miniWorst * 2n) });
      gw.stub.configure({ models: { [SONNET]: { status: 503 } } });
      const refused = await tight.api.post<ErrorBody>('/v1/chat/completions', { ...body, task_type: 'code' }, FRESH);
      expect(refused.status).toBe(402);
      expect(gw.stub.hits).toBe(0);

      const t = await gw.tenants.create({ userBudgetUsd: 1 });
      const res = await t.api.post<Completion>('/v1/chat/completions', { ...body, task_type: 'code' }, FRESH);
      expect(res.status).toBe(200);
      expect(res.body.model).toBe(MINI);
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows.length).toBe(gw.stub.hits);
      const failed = rows.filter((r) => r.outcome !== 'ok');
      expect(failed.length).toBeGreaterThanOrEqual(1);
      for (const r of failed) expect(r).toMatchObject({ model: SONNET, cost_nanos: '0', cost_source: 'none', status: 503 });
      const ok = rows.filter((r) => r.outcome === 'ok');
      expect(ok).toHaveLength(1);
      expect(ok[0]).toMatchObject({ model: MINI, cost_source: 'upstream', task_type: 'code' });
      expect(new Set(rows.map((r) => r.request_id)).size).toBe(1);
      expect(res.headers.get('x-gateway-cost-usd')).toBe(formatUsd(BigInt(ok[0]?.cost_nanos ?? -1)));
      const budget = await storedBudget(gw, 'user', t.userId);
      expect(budget.spent).toBe(BigInt(ok[0]?.cost_nanos ?? -1));
      expect(budget.reserved).toBe(0n);
    });

    it('releases everything when every attempt fails: 502, nothing charged, nothing left reserved', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 1, departmentBudgetUsd: 1 });
      gw.stub.configure({ status: 503 });
      const res = await chat(t);
      expect(res.status).toBe(502);
      const rows = await ledgerRows(gw, 'user', t.userId);
      expect(rows.length).toBe(gw.stub.hits);
      expect(rows.every((r) => r.cost_nanos === '0' && r.status === 503)).toBe(true);
      for (const scope of ['user', 'department'] as const) {
        const b = await storedBudget(gw, scope, scope === 'user' ? t.userId : t.departmentId);
        expect(b.spent).toBe(0n);
        expect(b.reserved).toBe(0n);
      }
    });

    it('refuses an over-budget call with the OpenAI error the SDK understands, before calling the upstream', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 0, period: 'weekly' });
      const err = await t.openai.chat.completions
        .create({ model: MINI, messages: [{ role: 'user', content: 'hi' }] }, { headers: FRESH })
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.APIError);
      const apiError = err as InstanceType<typeof OpenAI.APIError>;
      expect(apiError.status).toBe(402);
      expect(apiError.code).toBe('budget_exceeded');
      expect(apiError.param).toBe('user');
      expect(apiError.message).toMatch(/User budget exceeded.*weekly.*resets at \d{4}-\d\d-\d\dT00:00:00\.000Z/);
      expect(gw.stub.hits).toBe(0);
    });
  });

  describe('spend reports', () => {
    it('GET /v1/usage shows the caller its own budgets and spend per model, and nobody else’s', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 3, departmentBudgetUsd: 7, period: 'daily' });
      const colleague = await gw.tenants.create({ departmentId: t.departmentId });
      const first = await chat(t);
      const second = await chat(t, { model: SONNET });
      await chat(colleague);
      const paid = [first, second].reduce((n, r) => n + (parseUsd(r.headers.get('x-gateway-cost-usd') ?? 'x') ?? -1n), 0n);

      const usage = await t.api.get<{
        user: BudgetView;
        department: BudgetView;
        spend: Array<{ model: string; requests: number; prompt_tokens: number; completion_tokens: number; cost_usd: number }>;
        total_cost_usd: number;
      }>('/v1/usage');
      expect(usage.status).toBe(200);
      expect(usage.body.user).toMatchObject({
        scope: 'user',
        id: t.userId,
        limit_usd: 3,
        period: 'daily',
        spent_usd: Number(formatUsd(paid)),
        reserved_usd: 0,
      });
      expect(usage.body.department).toMatchObject({ scope: 'department', id: t.departmentId, limit_usd: 7 });
      expect(usage.body.department.spent_usd).toBeGreaterThan(usage.body.user.spent_usd ?? 0);
      expect(usage.body.spend.map((s) => s.model).sort()).toEqual([SONNET, MINI].sort());
      for (const line of usage.body.spend) {
        const res = line.model === MINI ? first : second;
        expect(line).toMatchObject({
          requests: 1,
          prompt_tokens: res.body.usage.prompt_tokens,
          completion_tokens: res.body.usage.completion_tokens,
          cost_usd: Number(res.headers.get('x-gateway-cost-usd')),
        });
      }
      expect(usage.body.total_cost_usd).toBe(Number(formatUsd(paid)));

      // Outside the window: nothing.
      const past = await t.api.get<{ spend: unknown[] }>('/v1/usage?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z');
      expect(past.body.spend).toEqual([]);
      const bad = await t.api.get<ErrorBody>('/v1/usage?from=yesterday');
      expect(bad.status).toBe(400);
      expect(bad.body.error.param).toBe('from');
    });

    it('agree with the ledger and the budgets after a mix of calls: /v1/usage total == Σ ledger == spent == /admin/spend', async () => {
      const t = await gw.tenants.create({ userBudgetUsd: 10, departmentBudgetUsd: 10 });
      const body = (content: string, extra: Record<string, unknown> = {}) => ({ model: MINI, messages: [{ role: 'user', content }], max_tokens: 30, ...extra });
      const unique = `mix ${Date.now()}`;
      expect((await t.api.post('/v1/chat/completions', body(`${unique} sync`))).status).toBe(200);
      expect((await t.api.post('/v1/chat/completions', body(`${unique} sync`))).status).toBe(200); // a cache hit
      expect((await postSse(gw, t.key, body(`${unique} stream a`, { stream: true, stream_options: { include_usage: true } }))).status).toBe(200);
      expect((await postSse(gw, t.key, body(`${unique} stream b`, { stream: true }))).status).toBe(200);
      expect((await postSse(gw, t.key, body(`${unique} stream b`, { stream: true }))).status).toBe(200); // a replay
      // A stream the caller leaves: charged an estimate of what it produced.
      gw.stub.configure({ chunkDelayMs: 30, completionTokens: 25 });
      await leaveMidway(gw, t.key, { model: MINI, stream: true, max_tokens: 30 }, { afterFirstChunk: true });
      await pollUntil(async () => expect((await ledgerRows(gw, 'user', t.userId)).some((r) => r.outcome === 'client_closed')).toBe(true));
      gw.stub.reset();
      expect((await t.api.post('/v1/complete', { prompt: `${unique} complete`, model: MINI, max_tokens: 30 })).status).toBe(200);
      const job = await t.api.post<{ id: string }>('/v1/chat/completions', body(`${unique} async`), { prefer: 'respond-async', ...FRESH });
      expect(job.status).toBe(202);
      await pollUntil(async () => expect((await t.api.get<{ status: string }>(`/v1/jobs/${job.body.id}`)).body.status).toBe('completed'));
      // A failed attempt that bills what it produced, then the answer.
      let tries = 0;
      gw.stub.script = (_req, sent, res) => {
        if (++tries > 1) return false;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({
            id: 'chatcmpl-x',
            object: 'chat.completion',
            created: 1,
            model: sent.model,
            choices: [{ index: 0, message: { role: 'assistant', content: 'w w' }, finish_reason: 'error' }],
            error: { code: 502, message: 'provider failed mid-generation' },
            usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cost: 0.000000777 },
          }),
        );
        return true;
      };
      expect((await t.api.post('/v1/chat/completions', body(`${unique} fallback`, { models: [MINI, 'anthropic/claude-3-haiku'] }), FRESH)).status).toBe(200);

      const rows = await ledgerRows(gw, 'user', t.userId);
      const sum = rows.reduce((n, r) => n + BigInt(r.cost_nanos), 0n);
      expect(rows.map((r) => r.cost_source)).toContain('estimate');
      const usage = await t.api.get<{ total_cost_usd: number; user: BudgetView; department: BudgetView }>('/v1/usage');
      expect(parseUsd(usage.body.total_cost_usd)).toBe(sum);
      expect(parseUsd(usage.body.user.spent_usd ?? -1)).toBe(sum);
      expect(parseUsd(usage.body.department.spent_usd ?? -1)).toBe(sum);
      const user = await storedBudget(gw, 'user', t.userId);
      expect(user).toMatchObject({ spent: sum, reserved: 0n });
      expect((await storedBudget(gw, 'department', t.departmentId)).spent).toBe(sum);
      const spend = await gw.admin.get<{ data: Array<{ user_id: string; cost_usd: number; requests: number }> }>('/admin/spend?group_by=user');
      const mine = spend.body.data.find((d) => d.user_id === t.userId);
      expect(parseUsd(mine?.cost_usd ?? -1)).toBe(sum);
      // sync, its hit, stream a, stream b, its replay, the one left, complete, async, the fallback
      expect(mine?.requests).toBe(9);
    });

    it('GET /admin/spend groups the ledger by user, department or model', async () => {
      const t = await gw.tenants.create();
      const res = await chat(t);
      const cost = Number(res.headers.get('x-gateway-cost-usd'));
      const from = new Date(Date.now() - 60_000).toISOString();

      const byUser = await gw.admin.get<{ group_by: string; data: Array<{ user_id: string; name: string; requests: number; cost_usd: number }> }>(
        `/admin/spend?group_by=user&from=${from}`,
      );
      expect(byUser.status).toBe(200);
      expect(byUser.body.group_by).toBe('user');
      expect(byUser.body.data.find((r) => r.user_id === t.userId)).toMatchObject({ requests: 1, cost_usd: cost });
      const byDept = await gw.admin.get<{ data: Array<{ department_id: string; cost_usd: number }> }>(`/admin/spend?group_by=department&from=${from}`);
      expect(byDept.body.data.find((r) => r.department_id === t.departmentId)).toMatchObject({ cost_usd: cost });
      const byModel = await gw.admin.get<{ data: Array<{ model: string; cost_usd: number }>; total_cost_usd: number }>(
        `/admin/spend?group_by=model&from=${from}`,
      );
      expect(byModel.body.data.find((r) => r.model === MINI)?.cost_usd).toBeGreaterThanOrEqual(cost);
      expect(byModel.body.total_cost_usd).toBeGreaterThanOrEqual(cost);

      for (const [query, param] of [
        ['group_by=team', 'group_by'],
        ['from=soon', 'from'],
        ['from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z', 'to'],
      ] as const) {
        const bad = await gw.admin.get<ErrorBody>(`/admin/spend?${query}`);
        expect(bad.status).toBe(400);
        expect(bad.body.error.param).toBe(param);
      }
      expect((await t.api.get('/admin/spend')).status).toBe(403);
    });
  });
});

// Why: a count of cache hits is one ledger row, and its token sums are `integer` columns. A
// cached answer reporting a huge prompt (here 1.5e9 tokens, more than a count row takes) once
// made two hits in the same second sum past `integer`: the flush rejected the row, set it aside,
// and those hits vanished from /v1/usage and /admin/spend. Each such hit now gets a row of its own.
describe('cache hits of an answer with a huge token count', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    // Stored every 5 s (the views store at once): the hits meet in one open count, as under load.
    gw = await startTestGateway({ env: { BUDGET_FLUSH_MS: '5000' } });
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('are all counted in the reports, with all their tokens', async () => {
    const t = await gw.tenants.create({});
    const huge = 1_500_000_000;
    gw.stub.script = (_req, _body, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify({
          id: 'x',
          object: 'chat.completion',
          created: 1,
          model: MINI,
          choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
          usage: { prompt_tokens: huge, completion_tokens: 1, total_tokens: huge + 1, cost: 0.001 },
        }),
      );
      return true;
    };
    const body = { model: MINI, messages: [{ role: 'user', content: 'same' }], max_tokens: 5, temperature: 0 };
    const caches: Array<string | null> = [];
    // One miss, then four hits within a few ms: at least two share a second, whatever the clock.
    for (let i = 0; i < 5; i++) {
      const r = await t.api.post('/v1/chat/completions', body);
      expect(r.status).toBe(200);
      caches.push(r.headers.get('x-gateway-cache'));
    }
    expect(caches.filter((c) => c === 'hit')).toHaveLength(4);

    const usage = await t.api.get<{ spend: Array<{ requests: number; prompt_tokens: number; completion_tokens: number }> }>('/v1/usage');
    expect(usage.body.spend).toHaveLength(1);
    expect(usage.body.spend[0]).toMatchObject({ requests: 5, prompt_tokens: 5 * huge, completion_tokens: 5 });
    const spend = await gw.admin.get<{ data: Array<{ user_id: string; requests: number }> }>('/admin/spend?group_by=user');
    expect(spend.body.data.find((d) => d.user_id === t.userId)?.requests).toBe(5);
  });
});
