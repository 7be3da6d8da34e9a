import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config/config.js';
import { createLogger } from '../../src/core/logger.js';
import { createGateway, type Gateway } from '../../src/gateway.js';

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
