import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { type AddressInfo, connect } from 'node:net';
import { createServer, type Server } from 'node:tls';
import { afterEach, describe, expect, it } from 'vitest';
import { pollUntil } from '../../src/core/testing/poll-until.js';
import { FAIL_FAST_OPTIONS, whenReady } from '../../src/redis/redis-connections.js';
import { LuaScript } from '../../src/redis/lua-script.js';
import { RespClient } from '../../src/redis/resp-client.js';
import { RedisReplyError } from '../../src/redis/resp-parser.js';
import { REDIS_URL } from '../support/databases.js';
import { startRedisProxy, type TcpProxy } from '../support/redis.js';

// The gateway's own Redis client against the real Redis on this machine (and a TCP relay in front
// of it to take the server away, or make it hang).

const open: RespClient[] = [];
const proxies: TcpProxy[] = [];
const servers: Server[] = [];
afterEach(async () => {
  for (const client of open.splice(0)) client.disconnect();
  for (const proxy of proxies.splice(0)) await proxy.stop();
  for (const server of servers.splice(0)) await new Promise((resolve) => server.close(resolve));
});

// A certificate for 127.0.0.1 made for these tests only (valid until 2126).
const TLS_CERT = readFileSync(new URL('../fixtures/tls/test-only-cert.pem', import.meta.url));
const TLS_KEY = readFileSync(new URL('../fixtures/tls/test-only-key.pem', import.meta.url));

/** A TLS front for the test Redis, as a managed Redis with `rediss://` would be. */
async function startTlsRedis(): Promise<string> {
  const redis = new URL(REDIS_URL);
  const server = createServer({ cert: TLS_CERT, key: TLS_KEY }, (socket) => {
    const upstream = connect(Number(redis.port || 6379), redis.hostname);
    socket.pipe(upstream).pipe(socket);
    socket.on('error', () => upstream.destroy());
    upstream.on('error', () => socket.destroy());
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return `rediss://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function client(url = REDIS_URL, overrides: Partial<typeof FAIL_FAST_OPTIONS> = {}): RespClient {
  const c = new RespClient(url, { ...FAIL_FAST_OPTIONS, name: 'gatehouse-test', ...overrides });
  c.on('error', () => undefined);
  open.push(c);
  return c;
}

const key = () => `gh-test:resp:${process.pid}:${randomBytes(4).toString('hex')}`;

describe('RespClient (real Redis)', () => {
  it('runs commands and scripts and returns what Redis answered, in order, however many are in flight', async () => {
    const c = client();
    await whenReady(c, 5000);
    const k = key();
    expect(await c.call('SET', k, 'naïve ✓', 'PX', 60_000)).toBe('OK');
    expect(await c.call('GET', k)).toBe('naïve ✓');
    expect(await c.call('GET', `${k}:absent`)).toBeNull();
    expect(await c.call('EVAL', "return {1, redis.call('GET', KEYS[1]), 7}", 1, k)).toEqual([1, 'naïve ✓', 7]);
    // 2,000 commands issued in one turn: every reply reaches its own caller.
    const replies = await Promise.all(Array.from({ length: 2000 }, (_, i) => c.call('INCRBY', `${k}:n`, i === 0 ? 1 : 0).then(() => c.call('ECHO', `r${i}`))));
    expect(replies).toEqual(Array.from({ length: 2000 }, (_, i) => `r${i}`));
    await c.call('DEL', k, `${k}:n`);
  });

  it('carries a large value both ways intact', async () => {
    const c = client();
    await whenReady(c, 5000);
    const k = key();
    const value = `${'ü'.repeat(400_000)}end`;
    await c.call('SET', k, value, 'PX', 60_000);
    expect(await c.call('GET', k)).toBe(value);
    await c.call('DEL', k);
  });

  it('fails only the command Redis refused; the next ones on the connection still work', async () => {
    const c = client();
    await whenReady(c, 5000);
    const refused = c.call('EVALSHA', 'f'.repeat(40), 0);
    const next = c.call('ECHO', 'still here');
    await expect(refused).rejects.toBeInstanceOf(RedisReplyError);
    await expect(refused).rejects.toThrow(/^NOSCRIPT/);
    expect(await next).toBe('still here');
  });

  it('selects the database named in the URL and names its connection', async () => {
    const url = new URL(REDIS_URL);
    url.pathname = '/7';
    const in7 = client(url.toString());
    const in0 = client();
    await Promise.all([whenReady(in7, 5000), whenReady(in0, 5000)]);
    const k = key();
    await in7.call('SET', k, 'seven', 'PX', 60_000);
    expect(await in0.call('GET', k)).toBeNull();
    expect(await in7.call('GET', k)).toBe('seven');
    expect(await in7.call('CLIENT', 'GETNAME')).toBe('gatehouse-test');
    await in7.call('DEL', k);
  });

  it('refuses commands at once while the server is away, and reconnects by itself when it is back', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    proxies.push(proxy);
    const c = client(proxy.url, { retryDelayMs: () => 50 });
    const events: string[] = [];
    c.on('ready', () => events.push('ready')).on('close', () => events.push('close'));
    await whenReady(c, 5000);
    const inFlight = c.call('BLPOP', key(), 5);
    await proxy.stop();
    await expect(inFlight).rejects.toThrow(/closed/);
    const started = performance.now();
    await expect(c.call('PING')).rejects.toThrow(/Redis connection is (reconnecting|connecting)/);
    expect(performance.now() - started).toBeLessThan(100);
    await proxy.start();
    await whenReady(c, 5000);
    expect(await c.call('PING')).toBe('PONG');
    expect(events).toEqual(['ready', 'close', 'ready']);
  });

  it('gives up on a server that stops answering: pending commands fail, and it is used again once it answers', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    proxies.push(proxy);
    const c = client(proxy.url, { commandTimeoutMs: 300, connectTimeoutMs: 300, retryDelayMs: () => 50 });
    await whenReady(c, 5000);
    proxy.freeze();
    const hung = c.call('PING');
    await expect(hung).rejects.toThrow(/did not answer within 300 ms/);
    // While it still hangs, reconnecting cannot finish the handshake: commands are refused at once.
    await expect(c.call('PING')).rejects.toThrow(/Redis connection is/);
    proxy.thaw();
    await whenReady(c, 5000);
    expect(await c.call('PING')).toBe('PONG');
  });

  it('speaks TLS for rediss:// and checks the server certificate', async () => {
    const url = await startTlsRedis();
    const trusted = client(url, { tls: { ca: TLS_CERT } });
    await whenReady(trusted, 5000);
    expect(await trusted.call('PING')).toBe('PONG');

    const errors: string[] = [];
    const untrusted = new RespClient(url, { ...FAIL_FAST_OPTIONS, name: 'gatehouse-test', retryDelayMs: () => 50 });
    untrusted.on('error', (error: Error) => errors.push(error.message));
    open.push(untrusted);
    await pollUntil(() => expect(errors.join()).toMatch(/self-signed certificate/));
    expect(untrusted.status).not.toBe('ready');
  });

  it('authenticates with the user and password of the URL, and never gets ready with a wrong one', async () => {
    const admin = client();
    await whenReady(admin, 5000);
    const user = `gh-test-${randomBytes(4).toString('hex')}`;
    const password = randomBytes(12).toString('hex');
    await admin.call('ACL', 'SETUSER', user, 'on', `>${password}`, '~*', '&*', '+@all');
    try {
      const url = new URL(REDIS_URL);
      url.username = user;
      url.password = password;
      const authed = client(url.toString());
      await whenReady(authed, 5000);
      expect(await authed.call('ACL', 'WHOAMI')).toBe(user);

      url.password = 'wrong';
      const errors: string[] = [];
      const refused = new RespClient(url.toString(), { ...FAIL_FAST_OPTIONS, name: 'gatehouse-test', retryDelayMs: () => 50 });
      refused.on('error', (error: Error) => errors.push(error.message));
      open.push(refused);
      await pollUntil(() => expect(errors.join()).toMatch(/WRONGPASS/));
      expect(refused.status).not.toBe('ready');
      await expect(refused.call('PING')).rejects.toThrow(/Redis connection is/);
    } finally {
      await admin.call('ACL', 'DELUSER', user);
    }
  });

  it('as a subscriber, hears what is published on its channel, and subscribes again after a reconnect', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    proxies.push(proxy);
    const channel = `gh-test:channel:${randomBytes(4).toString('hex')}`;
    const heard: string[] = [];
    const ear = client(proxy.url, { retryDelayMs: () => 50, subscribe: { channel, onMessage: (payload) => heard.push(payload) } });
    const mouth = client();
    await Promise.all([whenReady(ear, 5000), whenReady(mouth, 5000)]);
    expect(await mouth.call('PUBLISH', channel, 'one')).toBe(1);
    await mouth.call('PUBLISH', `${channel}:other`, 'not for us');
    await pollUntil(() => expect(heard).toEqual(['one']));

    const reconnected = new Promise((resolve) => ear.once('close', () => ear.once('ready', resolve)));
    await proxy.stop();
    await proxy.start();
    await reconnected;
    expect(await mouth.call('PUBLISH', channel, 'two')).toBe(1);
    await pollUntil(() => expect(heard).toEqual(['one', 'two']));
  });

  it('fires a command without a reply: Redis runs it and sends nothing back, and every later reply still reaches its own caller', async () => {
    const relay = await startRedisProxy(REDIS_URL);
    proxies.push(relay);
    const c = client(relay.url);
    await whenReady(c, 5000);
    expect(c.skipsReplies).toBe(true);
    const k = key();
    relay.resetReceived();
    c.fire('SET', k, 'v', 'PX', 60_000);
    expect(await c.call('GET', k)).toBe('v');
    // Only GET's reply ("$1\r\nv\r\n") came back, not SET's "+OK\r\n".
    expect(relay.received()).toBe(7);
    // Fired and awaited commands interleaved in one turn stay matched.
    const replies = await Promise.all(
      Array.from({ length: 500 }, (_, i) => {
        c.fire('SET', `${k}:${i}`, `v${i}`, 'PX', 60_000);
        return c.call('GET', `${k}:${i}`);
      }),
    );
    expect(replies).toEqual(Array.from({ length: 500 }, (_, i) => `v${i}`));
    // A script fired this way runs too (EVAL with its source, never an EVALSHA that could fail unseen).
    const script = new LuaScript("redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000) return 1", `test-fire-${randomBytes(3).toString('hex')}`);
    await script.fire(c, [`${k}:script`], ['ran']);
    expect(await c.call('GET', `${k}:script`)).toBe('ran');
    await c.call('DEL', k, `${k}:script`, ...Array.from({ length: 500 }, (_, i) => `${k}:${i}`));
  });

  it('skips no reply where CLIENT REPLY is not allowed (an ACL), and still runs fired scripts, as ordinary commands', async () => {
    const admin = client();
    await whenReady(admin, 5000);
    const user = `gh-test-${randomBytes(4).toString('hex')}`;
    const password = randomBytes(12).toString('hex');
    await admin.call('ACL', 'SETUSER', user, 'on', `>${password}`, '~*', '&*', '+@all', '-client|reply');
    try {
      const url = new URL(REDIS_URL);
      url.username = user;
      url.password = password;
      const c = client(url.toString(), { retryDelayMs: () => 20 });
      await whenReady(c, 5000);
      expect(c.skipsReplies).toBe(false);
      expect(() => c.fire('PING')).toThrow(/does not skip replies/);
      const k = key();
      const script = new LuaScript("redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000) return 1", `test-acl-${randomBytes(3).toString('hex')}`);
      await script.fire(c, [k], ['ran']);
      expect(await c.call('GET', k)).toBe('ran');
      expect(await c.call('ECHO', 'in step')).toBe('in step');
      await c.call('DEL', k);
    } finally {
      await admin.call('ACL', 'DELUSER', user);
    }
  });

  it('behind a proxy that answers CLIENT REPLY SKIP instead of honouring it, reconnects without skipping and keeps replies matched', async () => {
    // The proxy turns SKIP into ON: Redis answers it (+OK) and the ECHO after it.
    const relay = await startRedisProxy(REDIS_URL, {
      rewriteFromClient: (text) => text.replace('$5\r\nREPLY\r\n$4\r\nSKIP\r\n', '$5\r\nREPLY\r\n$2\r\nON\r\n'),
    });
    proxies.push(relay);
    const c = client(relay.url, { retryDelayMs: () => 20 });
    await whenReady(c, 5000);
    expect(c.skipsReplies).toBe(false);
    const replies = await Promise.all(Array.from({ length: 50 }, (_, i) => c.call('ECHO', `r${i}`)));
    expect(replies).toEqual(Array.from({ length: 50 }, (_, i) => `r${i}`));
  });

  it('probes again after a connection lost during its handshake: only an answer from Redis turns skipping off', async () => {
    const proxy = await startRedisProxy(REDIS_URL);
    proxies.push(proxy);
    proxy.freeze();
    const c = client(proxy.url, { retryDelayMs: () => 20 });
    // The handshake (and the probe in it) is held by the frozen relay, then the relay goes away.
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(c.status).toBe('connecting');
    await proxy.stop();
    proxy.thaw();
    await proxy.start();
    await whenReady(c, 5000);
    expect(c.skipsReplies).toBe(true);
  });

  it('quit waits for the answers already on their way, then stays closed', async () => {
    const c = client();
    await whenReady(c, 5000);
    const pending = c.call('ECHO', 'before quit');
    await c.quit();
    expect(await pending).toBe('before quit');
    expect(c.status).toBe('end');
    await expect(c.call('PING')).rejects.toThrow(/Redis connection is end/);
  });
});
