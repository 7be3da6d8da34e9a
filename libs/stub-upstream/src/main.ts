/**
 * CLI: runs the stub upstream as its own process (for the load benchmark, so the gateway
 * and the upstream do not share an event loop).
 *
 *   node dist/libs/stub-upstream/src/main.js [--port N] [--host H] [--no-record] [--config JSON]
 *
 * Prints exactly one JSON line `{"url": "...", "port": N}` on stdout once listening, so a
 * parent process can read the line and start driving it (faults via POST /__stub/config).
 */
import { parseArgs } from 'node:util';
import { parseStubConfig, startStubUpstream } from './stub-upstream.js';
import type { StubConfig } from './stub-upstream.js';

function fail(message: string): never {
  process.stderr.write(`stub-upstream: ${message}\n`);
  process.exit(2);
}

async function main(): Promise<void> {
  let values: { port?: string; host?: string; 'no-record'?: boolean; config?: string };
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: 'string' },
        host: { type: 'string' },
        'no-record': { type: 'boolean' },
        config: { type: 'string' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    fail(err instanceof Error ? err.message : String(err));
  }

  const port = values.port === undefined ? 0 : Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65_535) fail(`invalid --port ${values.port ?? ''}`);

  let config: StubConfig | undefined;
  if (values.config !== undefined) {
    try {
      config = parseStubConfig(JSON.parse(values.config));
    } catch (err) {
      fail(`invalid --config: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  const stub = await startStubUpstream({
    port,
    host: values.host ?? '127.0.0.1',
    recordRequests: values['no-record'] !== true,
    config,
  });
  process.stdout.write(`${JSON.stringify({ url: stub.url, port: stub.port })}\n`);

  const shutdown = (): void => {
    // Closing destroys every socket and fault timer, so the event loop empties and the
    // process exits on its own with code 0 — no process.exit() racing stdout.
    stub.close().catch((err: unknown) => {
      process.stderr.write(`stub-upstream: close failed: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    });
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
}

main().catch((err: unknown) => {
  fail(err instanceof Error ? err.message : String(err));
});
