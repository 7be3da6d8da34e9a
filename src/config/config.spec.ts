import { describe, expect, it } from 'vitest';
import { type AppConfig, ConfigError, describeConfig, loadConfig, loggableUrl } from './config.js';

describe('loadConfig', () => {
  it('defaults to the embedded, mock-upstream setup that needs no server', () => {
    const c = loadConfig({}, '/srv');
    expect(c.port).toBe(8080);
    expect(c.database).toEqual({ driver: 'pglite', dataDir: '/srv/data' });
    expect(c.upstream.mock).toBe(true);
    expect(c.upstream.driver).toBe('undici');
    expect(c.cache.driver).toBe('memory');
    expect(c.upstream.baseUrl).toBe('https://openrouter.ai/api/v1');
  });

  it('selects postgres and redis drivers from their URLs', () => {
    const c = loadConfig({ DATABASE_URL: 'postgres://u@h/db', REDIS_URL: 'redis://h:6379', OPENROUTER_API_KEY: 'sk-or-x' });
    expect(c.database).toEqual({ driver: 'postgres', url: 'postgres://u@h/db' });
    expect(c.cache.driver).toBe('redis');
    expect(c.rateLimit.driver).toBe('redis');
    expect(c.upstream.mock).toBe(false);
  });

  it('lists every problem at once and never echoes a secret', () => {
    let error: unknown;
    try {
      loadConfig({ PORT: 'eighty', UPSTREAM_DRIVER: 'curl', DATABASE_URL: 'mysql://root:hunter2@h/db', CACHE_DRIVER: 'redis', GATEHOUSE_ROLE: 'boss' });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const problems = (error as ConfigError).problems;
    expect(problems).toHaveLength(5);
    expect(problems.join('\n')).toContain('UPSTREAM_DRIVER must be one of undici, sdk');
    expect(problems.join('\n')).toContain('CACHE_DRIVER=redis needs REDIS_URL');
    expect(String((error as Error).message)).not.toContain('hunter2');
  });

  // Left to listen(), a bad HOST failed the start only after the database was opened (initdb'd on a
  // fresh DATA_DIR) and an admin key generated, as "getaddrinfo ENOTFOUND", naming no variable.
  it('refuses a HOST that is neither an IP address nor a host name, with the other problems', () => {
    const problemsOf = (env: Record<string, string>): string[] => {
      try {
        loadConfig(env, '/srv');
        return [];
      } catch (e) {
        return (e as ConfigError).problems;
      }
    };
    const both = problemsOf({ HOST: 'not a host', PORT: 'eighty' });
    expect(both.filter((p) => p.startsWith('HOST '))).toEqual(['HOST must be an IP address (such as 0.0.0.0, 127.0.0.1 or ::) or a host name, got "not a host"']);
    expect(both.some((p) => p.startsWith('PORT '))).toBe(true);
    for (const bad of ['999.1.1.1', '10.0.0', '[::]', 'gate_house:8080', '-leading.example', 'a..b']) {
      expect(problemsOf({ HOST: bad }), bad).toHaveLength(1);
    }
    expect(problemsOf({ HOST: '[::]' })[0]).toContain('without brackets');
    for (const good of ['0.0.0.0', '127.0.0.1', '::', '::1', 'fe80::1%eth0', 'localhost', 'gatehouse.internal.', 'api_1', 'my-host.example.com']) {
      expect(problemsOf({ HOST: good }), good).toEqual([]);
      expect(loadConfig({ HOST: good }).host).toBe(good);
    }
    expect(loadConfig({}).host).toBe('0.0.0.0');
  });

  it('refuses upstream header values an HTTP request cannot carry, naming the variable and never the key', () => {
    const problemsOf = (env: Record<string, string>): string[] => {
      try {
        loadConfig(env);
        return [];
      } catch (e) {
        return (e as ConfigError).problems;
      }
    };
    // A key pasted with a typographic quote, or with a space inside it.
    expect(problemsOf({ OPENROUTER_API_KEY: 'sk-or-v1-abc’def' })).toEqual([
      'OPENROUTER_API_KEY contains characters an HTTP header cannot carry (printable ASCII without spaces only)',
    ]);
    expect(problemsOf({ OPENROUTER_API_KEY: 'sk-or-v1 secret' }).join('\n')).not.toContain('secret');
    expect(problemsOf({ OPENROUTER_API_KEY: 'sk-or-v1 secret' })).toHaveLength(1);
    expect(problemsOf({ APP_TITLE: 'Gatehouse – Acme' })).toEqual([
      'APP_TITLE contains characters an HTTP header cannot carry (printable ASCII and Latin-1 only)',
    ]);
    expect(problemsOf({ APP_URL: 'https://acme.example/\nX-Injected: 1' })).toHaveLength(1);
    // Latin-1 is what a header may carry: accepted as it is.
    expect(loadConfig({ APP_TITLE: 'Gatehouse Café', OPENROUTER_API_KEY: 'sk-or-v1-0123abcdef' }).upstream).toMatchObject({
      title: 'Gatehouse Café',
      apiKey: 'sk-or-v1-0123abcdef',
    });
  });

  it('refuses an OPENROUTER_BASE_URL with credentials, a query string or a fragment, without echoing it', () => {
    const problemsOf = (value: string): string[] => {
      try {
        loadConfig({ OPENROUTER_API_KEY: 'sk-or-v1-0123abcdef', OPENROUTER_BASE_URL: value });
        return [];
      } catch (e) {
        return (e as ConfigError).problems;
      }
    };
    for (const value of [
      'http://user:s3cr3t-pw@upstream.example/v1',
      'http://s3cr3t-pw@upstream.example/v1',
      'https://upstream.example/v1?key=s3cr3t-pw',
      'https://upstream.example/v1#s3cr3t-pw',
      'https://upstream.example/v1?',
    ]) {
      const problems = problemsOf(value);
      expect(problems, value).toHaveLength(1);
      expect(problems[0], value).toMatch(/^OPENROUTER_BASE_URL must not contain /);
      expect(problems.join('\n'), value).not.toContain('s3cr3t-pw');
      expect(problems.join('\n'), value).not.toContain('upstream.example');
    }
    expect(problemsOf('http://user:pw@upstream.example/v1?x=1')[0]).toContain('credentials (user:password@), a query string');
    // An ordinary base URL (with a port and a path) is fine.
    expect(problemsOf('http://127.0.0.1:4010/api/v1/')).toEqual([]);
  });

  it('never logs URL credentials, whatever the config holds', () => {
    const base = loadConfig({ OPENROUTER_API_KEY: 'sk-or-v1-0123abcdef', DATABASE_URL: 'postgres://u:db-pw@h/db', REDIS_URL: 'redis://:redis-pw@h:6379' });
    // A config not built by loadConfig (tests, future callers) still logs no credentials.
    const config: AppConfig = { ...base, upstream: { ...base.upstream, baseUrl: 'http://user:up-pw@upstream.example:8443/v1?token=q-pw#f-pw' } };
    const text = JSON.stringify(describeConfig(config));
    expect(text).not.toMatch(/db-pw|redis-pw|up-pw|q-pw|f-pw|user:/);
    expect(text).toContain('http://upstream.example:8443/v1 via undici');
    expect(loggableUrl('not a url')).toBe('(not a valid URL)');
    expect(loggableUrl('https://openrouter.ai/api/v1')).toBe('https://openrouter.ai/api/v1');
  });

  it('reads TRUST_PROXY as none, any, a hop count or proxy addresses, and stops on an address it cannot read', () => {
    expect(loadConfig({}).trustProxy).toBe(false);
    expect(loadConfig({ TRUST_PROXY: 'false' }).trustProxy).toBe(false);
    expect(loadConfig({ TRUST_PROXY: 'true' }).trustProxy).toBe(true);
    expect(loadConfig({ TRUST_PROXY: '2' }).trustProxy).toBe(2);
    expect(loadConfig({ TRUST_PROXY: '10.0.0.0/8, 127.0.0.1,fd00::/8' }).trustProxy).toEqual(['10.0.0.0/8', '127.0.0.1', 'fd00::/8']);
    for (const bad of ['10.0.0.0/33', 'ingress.local', '10.0.0.1/8/2', ' , ']) {
      expect(() => loadConfig({ TRUST_PROXY: bad })).toThrow(ConfigError);
    }
  });

  // Each passed loadConfig and then failed the start later (exit 1, not 78): TypeORM and the Redis
  // client decodeURIComponent() the user and password ("URI malformed", no variable named), and the
  // Redis client read the database only once the embedded database had been opened and migrated.
  it('refuses DATABASE_URL and REDIS_URL values their clients cannot use, naming the variable and never the value', () => {
    const problemsOf = (env: Record<string, string>): string[] => {
      try {
        loadConfig(env);
        return [];
      } catch (e) {
        return (e as ConfigError).problems;
      }
    };
    expect(problemsOf({ DATABASE_URL: 'postgres://gatehouse:50%off@db.internal:5432/gatehouse' })).toEqual([
      'DATABASE_URL has a malformed %-escape in its user name, password or path (write a literal % as %25)',
    ]);
    expect(problemsOf({ REDIS_URL: 'redis://:50%off@redis.internal:6379' })).toEqual([
      'REDIS_URL has a malformed %-escape in its user name, password or path (write a literal % as %25)',
    ]);
    expect(problemsOf({ DATABASE_URL: 'postgres://gate%ZZhouse@db.internal/gatehouse' })).toHaveLength(1);
    for (const bad of ['redis://redis.internal:6379/cache', 'redis://redis.internal:6379/-1', 'redis://redis.internal:6379/1.5']) {
      expect(problemsOf({ REDIS_URL: bad }), bad).toEqual(['REDIS_URL: the database (the path after the host) must be a number, like redis://host:6379/0']);
    }
    // What the clients decode is accepted as it is.
    const c = loadConfig({ DATABASE_URL: 'postgres://gatehouse:50%25off@db.internal/gatehouse', REDIS_URL: 'rediss://default:p%40ss@redis.internal:6380/2' });
    expect(c.database).toEqual({ driver: 'postgres', url: 'postgres://gatehouse:50%25off@db.internal/gatehouse' });
    expect(c.redisUrl).toBe('rediss://default:p%40ss@redis.internal:6380/2');
    expect(loadConfig({ REDIS_URL: 'redis://redis.internal:6379/' }).redisUrl).toBe('redis://redis.internal:6379/');
  });

  // Both are presented as `Authorization: Bearer <value>`, which carries one run of visible ASCII:
  // a passphrase with spaces was accepted and then refused to every scraper (or admin), for ever.
  it('refuses a METRICS_TOKEN or ADMIN_API_KEY that cannot be sent as a bearer token, never echoing it', () => {
    const problemsOf = (env: Record<string, string>): string[] => {
      try {
        loadConfig(env);
        return [];
      } catch (e) {
        return (e as ConfigError).problems;
      }
    };
    for (const name of ['METRICS_TOKEN', 'ADMIN_API_KEY']) {
      for (const value of ['correct horse battery staple', 'pässwörd-0123456789abcdef', 'token-0123456789\tabcdef']) {
        const problems = problemsOf({ [name]: value });
        expect(problems, `${name}=${value}`).toEqual([
          `${name} must be printable ASCII without spaces: it is sent as "Authorization: Bearer <${name}>"`,
        ]);
      }
    }
    expect(loadConfig({ METRICS_TOKEN: 'a-long-metrics-token', ADMIN_API_KEY: 'gh-admin_0123456789+/=' })).toMatchObject({
      adminApiKey: 'gh-admin_0123456789+/=',
      telemetry: { metricsToken: 'a-long-metrics-token' },
    });
  });

  it('describes itself without secrets', () => {
    const c = loadConfig({ OPENROUTER_API_KEY: 'sk-or-secret', ADMIN_API_KEY: 'admin-key-0123456789', DATABASE_URL: 'postgres://u:pw@h/db' });
    expect(JSON.stringify(describeConfig(c))).not.toMatch(/sk-or-secret|admin-key|pw@/);
  });
});
