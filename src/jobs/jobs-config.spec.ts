import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../config/config.js';

const problemsOf = (env: Record<string, string>): string[] => {
  try {
    loadConfig(env);
    return [];
  } catch (error) {
    if (error instanceof ConfigError) return error.problems;
    throw error;
  }
};

describe('job queue configuration', () => {
  it('uses the inline queue without Redis and BullMQ with it, with the documented defaults', () => {
    expect(loadConfig({}).jobs).toEqual({
      driver: 'inline',
      concurrency: 8,
      maxQueued: 1000,
      maxAttempts: 3,
      backoffMs: 2000,
      backoffMaxMs: 60_000,
      callbackSecret: undefined,
      callbackPreviousSecret: undefined,
      callbackAllowedHosts: [],
      retentionHours: 720,
    });
    expect(loadConfig({ REDIS_URL: 'redis://127.0.0.1:6379' }).jobs.driver).toBe('bullmq');
    expect(loadConfig({ REDIS_URL: 'redis://127.0.0.1:6379', JOBS_DRIVER: 'inline' }).jobs.driver).toBe('inline');
  });

  it('refuses GATEHOUSE_ROLE=worker (and api) without the shared queue, saying why', () => {
    const [problem] = problemsOf({ GATEHOUSE_ROLE: 'worker' });
    expect(problem).toContain('GATEHOUSE_ROLE=worker needs the shared BullMQ queue');
    expect(problem).toContain('REDIS_URL');
    expect(problemsOf({ GATEHOUSE_ROLE: 'api' })[0]).toContain('GATEHOUSE_ROLE=api needs the shared BullMQ queue');
    const shared = { REDIS_URL: 'redis://127.0.0.1:6379', DATABASE_URL: 'postgres://gatehouse@db.internal/gatehouse' };
    expect(problemsOf({ GATEHOUSE_ROLE: 'worker', ...shared, JOBS_DRIVER: 'inline' })).toHaveLength(1);
    expect(problemsOf({ GATEHOUSE_ROLE: 'worker', ...shared })).toEqual([]);
    expect(problemsOf({ GATEHOUSE_ROLE: 'all' })).toEqual([]);
  });

  // Each process would open its own embedded database: the api answers 202, the worker takes the
  // BullMQ message, finds no job row and drops it, and the job stays queued for ever.
  it('refuses GATEHOUSE_ROLE=api or worker on the embedded database, naming both variables', () => {
    for (const role of ['api', 'worker']) {
      expect(problemsOf({ GATEHOUSE_ROLE: role, REDIS_URL: 'redis://127.0.0.1:6379' }), role).toEqual([
        `GATEHOUSE_ROLE=${role} needs DATABASE_URL: job rows must be in a database every process shares (the embedded database belongs to one process), or use GATEHOUSE_ROLE=all`,
      ]);
    }
    expect(loadConfig({ GATEHOUSE_ROLE: 'api', REDIS_URL: 'redis://127.0.0.1:6379', DATABASE_URL: 'postgres://gatehouse@db.internal/gatehouse' }).database.driver).toBe('postgres');
    expect(loadConfig({}).database.driver).toBe('pglite');
  });

  it('lists every bad jobs variable at once', () => {
    const problems = problemsOf({ JOBS_DRIVER: 'kafka', JOBS_MAX_QUEUED: '0', JOBS_MAX_ATTEMPTS: 'x', JOBS_CALLBACK_SECRET: 'short' });
    expect(problems).toEqual(
      expect.arrayContaining([
        expect.stringContaining('JOBS_DRIVER must be one of inline, bullmq'),
        expect.stringContaining('JOBS_MAX_QUEUED'),
        expect.stringContaining('JOBS_MAX_ATTEMPTS'),
        expect.stringContaining('JOBS_CALLBACK_SECRET'),
      ]),
    );
    expect(problemsOf({ JOBS_DRIVER: 'bullmq' })).toEqual(['JOBS_DRIVER=bullmq needs REDIS_URL']);
  });

  it('takes a previous callback secret only beside the one it is rotated to, distinct and as long', () => {
    const secret = 'new-callback-secret-0123456789';
    const previous = 'old-callback-secret-0123456789';
    expect(loadConfig({ JOBS_CALLBACK_SECRET: secret, JOBS_CALLBACK_SECRET_PREVIOUS: previous }).jobs).toMatchObject({
      callbackSecret: secret,
      callbackPreviousSecret: previous,
    });
    expect(problemsOf({ JOBS_CALLBACK_SECRET_PREVIOUS: previous })).toEqual([
      'JOBS_CALLBACK_SECRET_PREVIOUS is set without JOBS_CALLBACK_SECRET (the secret it is rotated to)',
    ]);
    expect(problemsOf({ JOBS_CALLBACK_SECRET: secret, JOBS_CALLBACK_SECRET_PREVIOUS: secret })).toEqual(['JOBS_CALLBACK_SECRET_PREVIOUS must differ from JOBS_CALLBACK_SECRET']);
    expect(problemsOf({ JOBS_CALLBACK_SECRET: secret, JOBS_CALLBACK_SECRET_PREVIOUS: 'short' })).toEqual(['JOBS_CALLBACK_SECRET_PREVIOUS must be at least 16 characters']);
  });

  it('keeps finished jobs 30 days unless JOBS_RETENTION_HOURS says otherwise (0 = for ever), and refuses to start on a bad value, saying why', () => {
    expect(loadConfig({ JOBS_RETENTION_HOURS: '0' }).jobs.retentionHours).toBe(0);
    expect(loadConfig({ JOBS_RETENTION_HOURS: '24' }).jobs.retentionHours).toBe(24);
    expect(loadConfig({ JOBS_RETENTION_HOURS: '8760' }).jobs.retentionHours).toBe(8760);
    // Sooner than a day would free an idempotency-key within the 24 h it promises the same job.
    expect(problemsOf({ JOBS_RETENTION_HOURS: '12' })).toEqual(['JOBS_RETENTION_HOURS must be 0 (keep jobs for ever) or at least 24, got "12"']);
    for (const bad of ['-1', '1.5', 'month', '876001']) {
      expect(problemsOf({ JOBS_RETENTION_HOURS: bad }), bad).toEqual([expect.stringMatching(/^JOBS_RETENTION_HOURS must be an integer from 0 to 876000/)]);
    }
  });

  it('reads JOBS_CALLBACK_ALLOWED_HOSTS as normalised entries and names each bad one', () => {
    expect(loadConfig({ JOBS_CALLBACK_ALLOWED_HOSTS: 'Hooks.Internal, *.example.com, 127.0.0.1, 10.0.0.0/8' }).jobs.callbackAllowedHosts).toEqual([
      'hooks.internal',
      '*.example.com',
      '127.0.0.1/32',
      '10.0.0.0/8',
    ]);
    expect(problemsOf({ JOBS_CALLBACK_ALLOWED_HOSTS: 'ok.example, https://hooks.example.com/x, 10.0.0.0/40' })).toEqual([
      expect.stringMatching(/^JOBS_CALLBACK_ALLOWED_HOSTS: "https:\/\/hooks\.example\.com\/x" is not/),
      expect.stringMatching(/^JOBS_CALLBACK_ALLOWED_HOSTS: "10\.0\.0\.0\/40" is not/),
    ]);
  });
});
