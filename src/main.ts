import { ConfigError, loadConfig } from './config/config.js';
import { createGateway, createWorker } from './gateway.js';

// The only place that reads process.env: loadConfig validates it all at once.
async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig(process.env);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`);
      process.exit(78); // EX_CONFIG
    }
    throw error;
  }
  // worker: no HTTP server, only the job queue (loadConfig refuses it without the shared queue).
  if (config.role === 'worker') await createWorker(config);
  else await createGateway(config);
}

main().catch((error: unknown) => {
  process.stderr.write(`Gatehouse failed to start: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
