import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditEventDto, AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { SEED_ROUTING_TABLE } from '../../src/routing/routing-table.js';
import { ledgerRows } from '../integration/budget-support.js';
import { pollUntil, startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

interface ErrorBody {
  error: { message: string; type: string; code: string; param?: string };
}

/**
 * The mode the README has a newcomer try first: no OPENROUTER_API_KEY, so the built-in mock
 * answers. It must refuse what a real OpenRouter refuses, or a typo in a model id is answered and
 * billed at the fallback price in the demo and only fails once a real key is set.
 */
describe('the built-in mock upstream answers model ids as OpenRouter does', () => {
  let gw: TestGateway;
  let alice: Tenant;

  beforeAll(async () => {
    gw = await startTestGateway({ mockUpstream: true });
    alice = await gw.tenants.create();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it("refuses a model id it does not know: the caller's 400 model_not_found, nothing charged, the request audited", async () => {
    const res = await alice.api.post<ErrorBody>('/v1/chat/completions', { model: 'foo/bar-9000', messages: [{ role: 'user', content: 'typo' }] });
    expect(res.status).toBe(400);
    expect(res.headers.get('x-gateway-upstream')).toBe('mock');
    expect(res.body.error).toMatchObject({ type: 'invalid_request_error', code: 'model_not_found', param: 'model' });
    expect(res.body.error.message).toContain('foo/bar-9000 is not a valid model ID');

    const streamed = await alice.api.post<ErrorBody>('/v1/chat/completions', {
      model: 'foo/bar-9000',
      stream: true,
      messages: [{ role: 'user', content: 'typo streamed' }],
    });
    expect(streamed.status).toBe(400);
    expect(streamed.body.error).toMatchObject({ code: 'model_not_found', param: 'model' });

    // Each refusal leaves its zero-cost row (the attempt is accounted for), never a charge.
    const rows = await ledgerRows(gw, 'user', alice.userId);
    expect(rows.map((r) => [r.model, r.status, r.cost_nanos])).toEqual([
      ['foo/bar-9000', 400, '0'],
      ['foo/bar-9000', 400, '0'],
    ]);
    const usage = await alice.api.get<{ total_cost_usd: number; spend: Array<{ cost_usd: number }> }>('/v1/usage');
    expect(usage.status).toBe(200);
    expect(Number(usage.body.total_cost_usd)).toBe(0);
    expect(usage.body.spend.every((s) => Number(s.cost_usd) === 0)).toBe(true);

    const requestId = res.headers.get('x-request-id');
    const audited = await pollUntil(async () => {
      const page = await gw.admin.get<AuditListDto>('/admin/audit?action=completion&limit=500');
      const row = page.body.data.find((e: AuditEventDto) => e.request_id === requestId);
      expect(row).toBeDefined();
      return row as AuditEventDto;
    });
    expect(audited).toMatchObject({ actor_user_id: alice.userId, status: 400 });
  });

  it('answers every model of the default routing table, and the ones the docs name, with a clean cost', async () => {
    const models = new Set([...SEED_ROUTING_TABLE.rules.flatMap((r) => [r.model, ...r.fallbacks]), 'openai/gpt-4o']);
    for (const model of models) {
      const res = await alice.api.post<{ model: string; usage: { cost?: number } }>('/v1/chat/completions', {
        model,
        messages: [{ role: 'user', content: `known ${model}` }],
      });
      expect(res.status, model).toBe(200);
      expect(res.body.model).toBe(model);
      expect(res.headers.get('x-gateway-upstream')).toBe('mock');
      // The decimal OpenRouter would send (0.0000039), not a float product's 0.0000039000000000000003.
      const cost = res.body.usage.cost ?? Number.NaN;
      expect(cost).toBe(Number(cost.toPrecision(12)));
      expect(cost).toBe(Number(res.headers.get('x-gateway-cost-usd')));
    }
    for (const rule of SEED_ROUTING_TABLE.rules) {
      const res = await alice.api.post<{ model: string }>('/v1/chat/completions', {
        model: 'auto',
        task_type: rule.task_type,
        messages: [{ role: 'user', content: `routed ${rule.task_type}` }],
      });
      expect(res.status, rule.task_type).toBe(200);
      expect(res.body.model).toBe(rule.model);
    }
  });
});
