import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES } from '../../src/config/config.js';
import { assertBundleIsFresh } from '../support/bundle.js';
import { pollUntil } from '../support/gateway.js';

const root = join(import.meta.dirname, '..', '..');

/**
 * `npm start` under a process manager (systemd, supervisord, a container whose command is npm):
 * the stop signal goes to npm, which passes it to its child. That child was `sh -c "… node …"`,
 * and the shell did not pass it on: the gateway kept serving, orphaned, and never drained. The
 * script now execs node, so npm's child is the gateway itself.
 */
describe('npm start and a stop signal', () => {
  it('drains and exits when npm is sent SIGTERM, leaving no gateway behind', { timeout: 120_000 }, async () => {
    assertBundleIsFresh();
    const dataDir = await mkdtemp(join(tmpdir(), 'gatehouse-npm-start-'));
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const name of Object.keys(CONFIG_VARIABLES)) delete env[name];
    Object.assign(env, { PORT: String(port), HOST: '127.0.0.1', DATA_DIR: dataDir, LOG_LEVEL: 'info', ADMIN_API_KEY: 'gh-npm-start-signal-test-admin-key' });
    // --ignore-scripts: the bundle is built already (npm test builds it); prestart would build again.
    // Its own process group, so that whatever it leaves behind can be cleaned up below.
    const npm = spawn('npm', ['start', '--ignore-scripts', '--silent'], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let out = '';
    npm.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    npm.stderr.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => npm.once('exit', (code) => resolve(code)));
    try {
      await pollUntil(async () => expect((await fetch(`http://127.0.0.1:${port}/health/ready`)).status).toBe(200), 90_000, 200);
      npm.kill('SIGTERM');
      await exited;
      // The gateway itself is gone (not only npm): nothing answers on its port.
      await pollUntil(async () => expect(await fetch(`http://127.0.0.1:${port}/health/live`).then(() => 'answered', () => 'gone')).toBe('gone'), 15_000, 100);
      expect(out).toContain('"msg":"drained"');
    } finally {
      // An orphaned gateway (the failure this test is about) is still in npm's process group.
      if (npm.pid !== undefined) {
        try {
          process.kill(-npm.pid, 'SIGKILL');
        } catch {
          // The group is empty: everything exited.
        }
      }
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});
