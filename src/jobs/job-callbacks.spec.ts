import { createHmac, timingSafeEqual } from 'node:crypto';
import type { LookupAddress } from 'node:dns';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import type { AppConfig } from '../config/config.js';
import { ManualClock } from '../core/clock.js';
import type { AppLogger } from '../core/logger.js';
import { CallbackPolicy, type Resolver } from './callback-policy.js';
import { JobCallbacks, SIGNATURE_HEADER, TIMESTAMP_HEADER } from './job-callbacks.js';
import type { JobRecord } from './job.types.js';

const SECRET = 'unit-callback-secret-0123456789';
const config = { jobs: { callbackSecret: SECRET } } as unknown as AppConfig;
const NOW = '2026-03-01T10:00:00Z';
const NOW_SECONDS = Date.parse(NOW) / 1000;

/**
 * What a receiver does (the verification docs/operations.md gives): the HMAC of "<t>.<raw body>"
 * compared in constant time with each `v1` (two while a secret is rotated), and a `t` within
 * 5 minutes of its own clock.
 */
function receiverAccepts(secret: string, header: string, rawBody: string, nowSeconds: number): boolean {
  const parts = header.split(',').map((part) => part.split('=', 2) as [string, string]);
  const t = Number(parts.find(([name]) => name === 't')?.[1]);
  if (!Number.isInteger(t) || Math.abs(nowSeconds - t) > 300) return false;
  const expected = createHmac('sha256', secret).update(`${t}.${rawBody}`).digest();
  return parts.some(([name, value]) => {
    if (name !== 'v1') return false;
    const given = Buffer.from(value, 'hex');
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
}

function finishedJob(callbackUrl: string): JobRecord {
  const at = new Date('2026-01-01T00:00:00Z');
  return {
    id: '00000000-0000-4000-8000-000000000001',
    userId: 'u',
    departmentId: 'd',
    keyId: 'k',
    status: 'completed',
    door: 'chat',
    requestBody: { model: 'auto', messages: [{ role: 'user', content: 'x' }] },
    taskType: null,
    cacheControl: { read: true, write: true, ttlSeconds: undefined },
    requestId: 'req',
    result: { object: 'chat.completion' },
    error: null,
    model: 'm',
    costNanos: null,
    attempts: 1,
    deadLettered: false,
    idempotencyKey: null,
    bodyHash: 'h',
    callbackUrl,
    createdAt: at,
    enqueuedAt: at,
    startedAt: at,
    completedAt: at,
  };
}

/**
 * Deliveries through the real agent to a receiver on loopback. Names resolve through a fake
 * resolver, so "a public-looking name that resolves to 127.0.0.1" needs no DNS server.
 */
describe('callback delivery through the callback policy', () => {
  let server: Server;
  let port: number;
  const received: Array<{
    url: string;
    signature: string | string[] | undefined;
    timestamp: string | string[] | undefined;
    jobId: string | string[] | undefined;
    body: string;
  }> = [];
  const lookups: string[] = [];
  const resolver: Resolver = (hostname, _options, callback) => {
    lookups.push(hostname);
    const loopback: LookupAddress[] = [{ address: '127.0.0.1', family: 4 }];
    callback(null, loopback);
  };
  const warn = vi.fn();
  const logger = { child: () => logger, warn, info: vi.fn(), error: vi.fn(), debug: vi.fn() } as unknown as Logger;
  const appLogger: AppLogger = { logger };

  beforeAll(async () => {
    server = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => (body += chunk.toString()));
      req.on('end', () => {
        const { headers } = req;
        received.push({
          url: req.url ?? '',
          signature: headers[SIGNATURE_HEADER],
          timestamp: headers[TIMESTAMP_HEADER],
          jobId: headers['x-gatehouse-job-id'],
          body,
        });
        if (req.url?.startsWith('/moved')) res.writeHead(307, { location: '/followed' }).end();
        else if (req.url?.startsWith('/failing')) res.writeHead(503).end();
        else res.writeHead(204).end();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });
  afterAll(async () => {
    await new Promise((resolve) => server.close(resolve));
  });
  beforeEach(() => {
    received.length = 0;
    lookups.length = 0;
    warn.mockClear();
  });

  async function deliver(allowedHosts: string[], url: string, withConfig: AppConfig = config): Promise<void> {
    const callbacks = new JobCallbacks(withConfig, appLogger, new CallbackPolicy(allowedHosts, resolver), new ManualClock(Date.parse(NOW)));
    try {
      callbacks.notify(finishedJob(url));
      await callbacks.drain();
    } finally {
      await callbacks.onApplicationShutdown();
    }
  }

  it('refuses a public-looking name that resolves to loopback: nothing sent, logged once by host, not retried', async () => {
    const started = Date.now();
    await deliver([], `http://rebind.example.test:${port}/hook?token=s3cret`);
    expect(received).toEqual([]);
    expect(lookups).toEqual(['rebind.example.test']);
    // A retry would wait a second first.
    expect(Date.now() - started).toBeLessThan(900);
    expect(warn).toHaveBeenCalledTimes(1);
    const [fields, message] = warn.mock.calls[0] as [Record<string, unknown>, string];
    expect(message).toBe('callback not delivered: host not allowed');
    expect(fields).toMatchObject({ jobId: '00000000-0000-4000-8000-000000000001', host: `rebind.example.test:${port}` });
    expect(JSON.stringify(fields)).not.toContain('s3cret');
    expect(JSON.stringify(fields)).not.toContain('/hook');
  });

  it('refuses the same name under a *.suffix entry: a wildcard does not vouch for where subdomains resolve', async () => {
    await deliver(['*.example.test'], `http://rebind.example.test:${port}/hook`);
    expect(received).toEqual([]);
    expect(warn).toHaveBeenCalledTimes(1);
  });

  it('refuses an IP literal the policy no longer allows (a job submitted before the list changed)', async () => {
    await deliver(['hooks.example.test'], `http://127.0.0.1:${port}/hook`);
    expect(received).toEqual([]);
    expect(lookups).toEqual([]);
    expect(warn).toHaveBeenCalledTimes(1);
    expect((warn.mock.calls[0] as [Record<string, unknown>])[0]).toMatchObject({ host: `127.0.0.1:${port}` });
  });

  it('delivers, signed, when the list names the host exactly or covers its address', async () => {
    await deliver(['rebind.example.test'], `http://rebind.example.test:${port}/by-name`);
    await deliver(['*.example.test', '127.0.0.0/8'], `http://rebind.example.test:${port}/by-range`);
    await deliver(['127.0.0.1/32'], `http://127.0.0.1:${port}/literal`);
    expect(received.map((r) => r.url)).toEqual(['/by-name', '/by-range', '/literal']);
    for (const r of received) expect(r.signature).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
    expect(warn).not.toHaveBeenCalled();
  });

  it('does not follow a redirect: the signed body goes only where the submitter said; logged, not retried', async () => {
    await deliver(['127.0.0.1/32'], `http://127.0.0.1:${port}/moved?token=s3cret`);
    expect(received.map((r) => r.url)).toEqual(['/moved?token=s3cret']);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]).toEqual([{ jobId: '00000000-0000-4000-8000-000000000001', status: 307 }, 'callback receiver refused the delivery']);
  });

  it('tries a receiver that answers 5xx three times in all, then gives up saying so by host', async () => {
    await deliver(['127.0.0.1/32'], `http://127.0.0.1:${port}/failing?token=s3cret`);
    expect(received.map((r) => r.url)).toEqual(Array.from({ length: 3 }, () => '/failing?token=s3cret'));
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]).toEqual([
      { jobId: '00000000-0000-4000-8000-000000000001', host: `127.0.0.1:${port}`, err: 'HTTP 503' },
      'callback delivery failed after retries',
    ]);
  });

  it('signs the delivery time with the body: a receiver verifies it now, and refuses the same delivery replayed later or re-dated', async () => {
    await deliver(['127.0.0.1/32'], `http://127.0.0.1:${port}/signed`);
    const [delivery] = received;
    const signature = String(delivery?.signature);
    const body = delivery?.body ?? '';
    expect(signature).toMatch(new RegExp(`^t=${NOW_SECONDS},v1=[0-9a-f]{64}$`));
    expect(delivery).toMatchObject({ timestamp: String(NOW_SECONDS), jobId: '00000000-0000-4000-8000-000000000001' });
    expect(JSON.parse(body)).toMatchObject({ id: '00000000-0000-4000-8000-000000000001', status: 'completed' });
    expect(receiverAccepts(SECRET, signature, body, NOW_SECONDS + 10)).toBe(true);
    // Captured and replayed an hour later: refused.
    expect(receiverAccepts(SECRET, signature, body, NOW_SECONDS + 3600)).toBe(false);
    // Re-dated to pass the tolerance: the time is under the HMAC, so the signature no longer matches.
    expect(receiverAccepts(SECRET, signature.replace(`t=${NOW_SECONDS}`, `t=${NOW_SECONDS + 3600}`), body, NOW_SECONDS + 3600)).toBe(false);
    expect(receiverAccepts(SECRET, signature, body.replace('completed', 'failed'), NOW_SECONDS)).toBe(false);
    expect(receiverAccepts('another-secret-0123456789', signature, body, NOW_SECONDS)).toBe(false);
  });

  it('while a secret is rotated, signs with both: receivers on the old secret and on the new one verify, others do not', async () => {
    const previous = 'old-callback-secret-0123456789';
    const rotating = { jobs: { callbackSecret: SECRET, callbackPreviousSecret: previous } } as unknown as AppConfig;
    await deliver(['127.0.0.1/32'], `http://127.0.0.1:${port}/rotating`, rotating);
    const [delivery] = received;
    const signature = String(delivery?.signature);
    const body = delivery?.body ?? '';
    expect(signature).toMatch(new RegExp(`^t=${NOW_SECONDS},v1=[0-9a-f]{64},v1=[0-9a-f]{64}$`));
    expect(receiverAccepts(SECRET, signature, body, NOW_SECONDS)).toBe(true);
    expect(receiverAccepts(previous, signature, body, NOW_SECONDS)).toBe(true);
    expect(receiverAccepts('another-secret-0123456789', signature, body, NOW_SECONDS)).toBe(false);
    expect(receiverAccepts(previous, signature, body.replace('completed', 'failed'), NOW_SECONDS)).toBe(false);
  });
});
