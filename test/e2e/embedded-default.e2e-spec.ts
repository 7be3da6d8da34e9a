import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { AuditListDto } from '../../src/audit/admin/audit-admin.dto.js';
import { loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { createGateway, type Gateway } from '../../src/gateway.js';
import { pgliteTarget } from '../support/databases.js';
import { ApiClient, pollUntil } from '../support/gateway.js';

/**
 * What a newcomer gets from `npm start` with no environment at all: embedded PGlite under
 * DATA_DIR, the built-in mock upstream (loudly marked), and a generated admin key.
 */
describe('the embedded default (no database server, no upstream key, no admin key)', () => {
  let dataDir: string;
  let first: Gateway | undefined;
  let second: Gateway | undefined;

  const start = () =>
    createGateway(loadConfig({ DATA_DIR: dataDir, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'silent' }), { logger: createLogger('silent') });

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-embedded-'));
  });
  afterAll(async () => {
    await first?.close();
    await second?.close();
    await rm(dataDir, { recursive: true, force: true });
  });

  it('generates an admin key on first start, answers from the marked mock, and keeps data across a restart', async () => {
    first = await start();
    const adminKey = first.generatedAdminKey;
    expect(adminKey).toMatch(/^gh-/);

    const openai = new OpenAI({ apiKey: adminKey, baseURL: `${first.url}/v1`, maxRetries: 0 });
    const { data, response } = await openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'hello gateway' }] }).withResponse();
    expect(data.choices[0]?.message.content).toContain('hello gateway');
    expect(response.headers.get('x-gateway-upstream')).toBe('mock');

    const stream = await openai.chat.completions.create({ model: 'auto', messages: [{ role: 'user', content: 'stream' }], stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
    expect(text).toContain('stream');
    // Every response says so, not only completions: a submitted job, a list of models, an error.
    const submitted = await fetch(`${first.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${adminKey}`, 'content-type': 'application/json', prefer: 'respond-async' },
      body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'later' }] }),
    });
    expect(submitted.status).toBe(202);
    expect(submitted.headers.get('x-gateway-upstream')).toBe('mock');
    const models = await fetch(`${first.url}/v1/models`, { headers: { authorization: `Bearer ${adminKey}` } });
    expect(models.headers.get('x-gateway-upstream')).toBe('mock');
    const refused = await fetch(`${first.url}/v1/models`);
    expect(refused.status).toBe(401);
    expect(refused.headers.get('x-gateway-upstream')).toBe('mock');
    const undecodable = await fetch(`${first.url}/v1/models/%zz`, { headers: { authorization: `Bearer ${adminKey}` } });
    expect(undecodable.status).toBe(400);
    expect(undecodable.headers.get('x-gateway-upstream')).toBe('mock');
    expect((await fetch(`${first.url}/metrics`)).headers.get('x-gateway-upstream')).toBe('mock');

    const dept = await fetch(`${first.url}/admin/departments`, {
      method: 'POST',
      headers: { authorization: `Bearer ${adminKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'Persisted' }),
    });
    expect(dept.status).toBe(201);
    await first.close();
    first = undefined;

    second = await start();
    // No second key is generated: the first one is still there and still works.
    expect(second.generatedAdminKey).toBeUndefined();
    const list = await fetch(`${second.url}/admin/departments`, { headers: { authorization: `Bearer ${adminKey}` } });
    expect(list.status).toBe(200);
    const body = (await list.json()) as { data: Array<{ name: string }> };
    expect(body.data.map((d) => d.name)).toContain('Persisted');
  });
});

/**
 * The most common first-start failure of `npm start` is a port already taken (8080 is popular).
 * The admin key is generated while the app initialises, before it listens: a start that then dies
 * must neither show it nor leave it active, or the next, successful start would find an admin key
 * and show none, and the install's only admin key would be one printed above an EADDRINUSE.
 */
describe('a first start that fails after generating the admin key', () => {
  let dataDir: string;
  let blocker: Server;
  let blockedPort: number;
  let gateway: Gateway | undefined;

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-embedded-failed-start-'));
    blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    blockedPort = (blocker.address() as { port: number }).port;
  });
  afterAll(async () => {
    await gateway?.close();
    await new Promise((resolve) => blocker.close(resolve));
    await rm(dataDir, { recursive: true, force: true });
  });

  // The run's migrated template instead of initdb: the key is generated all the same.
  const start = async (port: number) => {
    const target = await pgliteTarget();
    return createGateway(loadConfig({ DATA_DIR: dataDir, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'silent', AUDIT_FLUSH_MS: '20' }), {
      logger: createLogger('silent'),
      databaseTarget: { driver: 'pglite', dataDir, template: 'template' in target ? target.template : undefined },
    });
  };

  it('prints no key, and the next start generates and shows the one that works', async () => {
    const stdout = vi.spyOn(process.stdout, 'write');
    try {
      await expect(start(blockedPort)).rejects.toThrow(/EADDRINUSE/);
      expect(stdout.mock.calls.map(([chunk]) => String(chunk)).join('')).not.toContain('gh-');
    } finally {
      stdout.mockRestore();
    }

    // The user frees the port, or picks another one, and starts again.
    gateway = await start(0);
    const key = gateway.generatedAdminKey;
    expect(key).toMatch(/^gh-/);
    const admin = new ApiClient(gateway.url, key);
    const keys = await admin.get<{ data: Array<{ prefix: string; revoked_at: string | null }> }>('/admin/keys');
    expect(keys.status).toBe(200);
    // The failed start's key was stored, and is revoked: nobody ever saw it.
    expect(keys.body.data.map((k) => k.revoked_at === null)).toEqual([false, true]);
    const revoked = await pollUntil(async () => {
      const res = await admin.get<AuditListDto>('/admin/audit?action=bootstrap.revoke_key');
      expect(res.body.data).toHaveLength(1);
      return res.body.data[0];
    });
    expect(revoked).toMatchObject({ target_id: expect.any(String), details: { actor: 'system:bootstrap', prefix: keys.body.data[0]?.prefix } });
  });
});
