import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestGateway, type Tenant, type TestGateway } from '../support/gateway.js';

// The OpenAPI document at /docs/openapi.json (README: "OpenAPI docs") must describe the admin
// routes as they behave: a client generated from it, or Swagger UI's "Try it out", otherwise
// sends requests the gateway does not mean, or cannot make the ones it does. Each case puts the
// document next to a real answer of the route it describes, so the two cannot drift apart.

interface Parameter {
  name: string;
  in: string;
  required?: boolean;
}
interface Operation {
  parameters?: Parameter[];
  responses: Record<string, { content?: { 'application/json'?: { schema?: { $ref?: string } } } }>;
}
interface Doc {
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, { properties?: Record<string, { type?: string }> }> };
}

describe('OpenAPI document of the admin API', () => {
  let gw: TestGateway;
  let alice: Tenant;
  let doc: Doc;

  beforeAll(async () => {
    gw = await startTestGateway();
    alice = await gw.tenants.create();
    const res = await gw.admin.get<Doc>('/docs/openapi.json');
    expect(res.status).toBe(200);
    doc = res.body;
  });
  afterAll(async () => {
    await gw?.close();
  });

  const op = (path: string, method: string): Operation => {
    const found = doc.paths[path]?.[method];
    if (!found) throw new Error(`${method.toUpperCase()} ${path} is not in the document`);
    return found;
  };
  const documentedFields = (o: Operation, status: number): string[] => {
    const ref = o.responses[String(status)]?.content?.['application/json']?.schema?.$ref ?? '';
    return Object.keys(doc.components.schemas[ref.replace('#/components/schemas/', '')]?.properties ?? {}).sort();
  };

  it('documents the list filters of users and keys as optional, as the routes treat them', async () => {
    expect((await gw.admin.get('/admin/users')).status).toBe(200);
    expect((await gw.admin.get('/admin/keys')).status).toBe(200);
    // A required filter would keep a generated client from ever listing everyone.
    expect(op('/admin/users', 'get').parameters?.find((p) => p.name === 'department_id')?.required ?? false).toBe(false);
    expect(op('/admin/keys', 'get').parameters?.find((p) => p.name === 'user_id')?.required ?? false).toBe(false);
  });

  it('declares every {placeholder} of an admin path as a path parameter, and no path parameter the path lacks', () => {
    const problems: string[] = [];
    for (const [path, ops] of Object.entries(doc.paths)) {
      if (!path.startsWith('/admin')) continue;
      const placeholders = [...path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]);
      for (const [method, o] of Object.entries(ops)) {
        const declared = (o.parameters ?? []).filter((p) => p.in === 'path').map((p) => p.name);
        for (const name of placeholders) if (!declared.includes(name)) problems.push(`${method.toUpperCase()} ${path}: {${name}} not declared`);
        for (const name of declared) if (!placeholders.includes(name)) problems.push(`${method.toUpperCase()} ${path}: parameter '${name}' not in the path`);
      }
    }
    // The pricing routes once declared a parameter named '*' (the Fastify wildcard) under /admin/pricing/{path}.
    expect(problems).toEqual([]);
  });

  it('a pricing request built from the document reaches the model it names', async () => {
    const path = Object.keys(doc.paths).find((p) => p.startsWith('/admin/pricing/{'));
    expect(path).toBe('/admin/pricing/{path}');
    // Swagger UI fills a path parameter percent-encoded, the model id's slash included.
    const res = await gw.admin.get<{ model: string }>(path!.replace('{path}', encodeURIComponent('openai/gpt-4o-mini')));
    expect(res).toMatchObject({ status: 200, body: { model: 'openai/gpt-4o-mini' } });
  });

  it('documents the rate-limit routes as answering the view they answer, with its status', async () => {
    const path = `/admin/rate-limits/users/${alice.userId}`;
    const answers = {
      get: await gw.admin.get<Record<string, unknown>>(path),
      put: await gw.admin.put<Record<string, unknown>>(path, { requests_per_minute: 600, tokens_per_minute: 200000 }),
      delete: await gw.admin.delete<Record<string, unknown>>(path),
    };
    for (const [method, res] of Object.entries(answers)) {
      expect(res.status, method).toBe(200);
      expect(documentedFields(op('/admin/rate-limits/{scope}/{id}', method), res.status), method).toEqual(Object.keys(res.body).sort());
    }
    // tokens_per_minute is an integer or null; the request body once documented it as an object.
    expect(doc.components.schemas.PutRateLimitDto?.properties?.tokens_per_minute?.type).toBe('number');
  });

  it('documents a rollback with the status it answers', async () => {
    const res = await gw.admin.post<Record<string, unknown>>('/admin/routing/rollback/1', {});
    // 201, as a POST that writes a new version; the document once said 200 only.
    expect(res.status).toBe(201);
    expect(Object.keys(op('/admin/routing/rollback/{version}', 'post').responses)).toContain('201');
  });
});
