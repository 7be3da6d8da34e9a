/**
 * CLI: the floor proxy, or with --parse the parse floor, as its own process.
 *   node dist/bench/floor-proxy-main.js --upstream http://127.0.0.1:43123 [--port 0] [--parse]
 * Prints one JSON line {"url","port"} once listening; SIGTERM closes it.
 */
import { parseArgs } from 'node:util';
import { startFloorProxy } from './floor-proxy.js';
import { startParseFloorProxy } from './parse-floor-proxy.js';

const { values } = parseArgs({ options: { upstream: { type: 'string' }, port: { type: 'string' }, parse: { type: 'boolean' } }, strict: true });
if (values.upstream === undefined) {
  process.stderr.write('floor-proxy: --upstream is required\n');
  process.exit(2);
}
const start = values.parse === true ? startParseFloorProxy : startFloorProxy;
const proxy = await start(values.upstream, Number(values.port ?? 0));
process.stdout.write(`${JSON.stringify({ url: proxy.url, port: proxy.port })}\n`);
const shutdown = (): void => {
  void proxy.close();
};
process.once('SIGTERM', shutdown);
process.once('SIGINT', shutdown);
