import { describe, expect, it } from 'vitest';
import { ConfigError, describeConfig, loadConfig } from './config.js';

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

  it('describes itself without secrets', () => {
    const c = loadConfig({ OPENROUTER_API_KEY: 'sk-or-secret', ADMIN_API_KEY: 'admin-key-0123456789', DATABASE_URL: 'postgres://u:pw@h/db' });
    expect(JSON.stringify(describeConfig(c))).not.toMatch(/sk-or-secret|admin-key|pw@/);
  });
});
