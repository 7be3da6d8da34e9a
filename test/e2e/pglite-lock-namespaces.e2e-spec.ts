import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES } from '../../src/config/config.js';
import { assertBundleIsFresh, BUNDLE } from '../support/bundle.js';
import { pollUntil } from '../support/gateway.js';

const root = join(import.meta.dirname, '..', '..');
const ADMIN = 'gh-pglite-lock-namespaces-admin-key';

interface Started {
  pid: number;
  port: number;
  /** stdout and stderr as they came. */
  out(): string;
  /** Its exit code once it has exited, else undefined. */
  exitCode(): number | null | undefined;
  kill(): void;
}

/**
 * Two containers of the image on one machine with /app/data on one volume: a rolling update whose
 * new pod lands on the node before the old one stopped, `docker compose up --scale`, a second
 * `docker run -v data:/app/data`. Each has a pid namespace of its own, where the other's pid is
 * nobody or its own pid 1, so `gatehouse.lock` cannot go by pids alone: before its heartbeat the
 * second gateway took the lock over and both ran PGlite on the same files. `unshare --pid` stands
 * in for the second container (root or user namespaces needed). The gateways are the shipped
 * bundle, as `npm start` and the image run it.
 */
describe("the embedded database's lock across pid namespaces (two containers, one volume)", () => {
  let dataDir: string;
  const started: Started[] = [];

  beforeAll(() => {
    assertBundleIsFresh();
  });
  afterEach(async () => {
    for (const gateway of started.splice(0)) gateway.kill();
    await new Promise((resolve) => setTimeout(resolve, 500));
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true });
  });

  function start(port: number, inOwnPidNamespace: boolean): Started {
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const name of Object.keys(CONFIG_VARIABLES)) delete env[name];
    Object.assign(env, { PORT: String(port), HOST: '127.0.0.1', DATA_DIR: dataDir, LOG_LEVEL: 'info', ADMIN_API_KEY: ADMIN });
    const [command, ...args] = inOwnPidNamespace
      ? ['unshare', '--pid', '--fork', '--kill-child', '--mount-proc', process.execPath, BUNDLE]
      : [process.execPath, BUNDLE];
    const child = spawn(command, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let exitCode: number | null | undefined;
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.once('exit', (code) => (exitCode = code));
    const gateway: Started = {
      pid: child.pid as number,
      port,
      out: () => out,
      exitCode: () => exitCode,
      kill: () => child.kill('SIGKILL'),
    };
    started.push(gateway);
    return gateway;
  }

  /** 'ready', or its exit code: whichever comes first. */
  async function outcome(gateway: Started, withinMs: number): Promise<'ready' | number | null> {
    await pollUntil(() => expect(gateway.exitCode() !== undefined || gateway.out().includes('"msg":"ready"')).toBe(true), withinMs, 200);
    return gateway.out().includes('"msg":"ready"') ? 'ready' : (gateway.exitCode() as number | null);
  }

  const lockFile = () => readFileSync(join(dataDir, 'gatehouse.lock'), 'utf8');

  it('refuses a second gateway in another pid namespace, and in the same one, and leaves the first its lock', { timeout: 180_000 }, async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-lock-ns-'));
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    const first = start(port, false);
    expect(await outcome(first, 120_000)).toBe('ready');
    const held = lockFile();
    expect(held.split('\n')[0]).toBe(String(first.pid));

    // Its heartbeat gives it away within a few seconds, whatever the pid says.
    const container = start(port + 1, true);
    expect(await outcome(container, 60_000)).toBe(1);
    expect(container.out()).toContain(`Gatehouse failed to start: PGlite data directory ${dataDir} is in use by process ${first.pid}`);
    expect(container.out()).not.toContain('"msg":"ready"');

    const sameMachine = start(port + 2, false);
    expect(await outcome(sameMachine, 60_000)).toBe(1);
    expect(sameMachine.out()).toContain(`is in use by process ${first.pid}`);

    // Neither took the lock nor removed it on its way out, and the first still serves.
    expect(lockFile()).toBe(held);
    expect((await fetch(`http://127.0.0.1:${port}/health/ready`)).status).toBe(200);
  });

  it(
    'takes the directory over in another pid namespace once a killed gateway’s lock has gone stale (a restart after a crash)',
    { timeout: 180_000 },
    async () => {
      dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-lock-ns-'));
      const port = 20_000 + Math.floor(Math.random() * 20_000);
      const crashed = start(port, false);
      expect(await outcome(crashed, 120_000)).toBe('ready');
      crashed.kill();
      await pollUntil(() => expect(crashed.exitCode()).not.toBeUndefined(), 5000, 50);
      expect(lockFile().split('\n')[0]).toBe(String(crashed.pid));

      const restarted = start(port + 1, true);
      // 15 s until the lock is stale, then a reopen: no initdb this time.
      expect(await outcome(restarted, 60_000)).toBe('ready');
      expect(restarted.out()).toContain('to go stale');
      // pid 1: the first process of its namespace, as in a container.
      expect(lockFile().split('\n')[0]).toBe('1');
      const made = await fetch(`http://127.0.0.1:${port + 1}/admin/departments`, {
        method: 'POST',
        headers: { authorization: `Bearer ${ADMIN}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'after-takeover' }),
      });
      expect(made.status).toBe(201);
    },
  );
});
