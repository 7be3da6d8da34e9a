/**
 * The gateway under V8's CPU profiler (the sampler behind `node --cpu-prof`), started and stopped
 * over IPC so the profile covers exactly the load window, not start-up and migrations.
 *
 *   parent → { profile: 'start', intervalUs } … { profile: 'stop', path } → parent gets { profiled: path }
 *
 * It runs dist/src, the modules the bundle `npm start` runs is made of: the same code, but each
 * frame keeps its own file, which is what the summary attributes areas and packages by. Bundled,
 * every frame would sit in dist/bundle/main.js.
 */
import { writeFile } from 'node:fs/promises';
import { Session } from 'node:inspector/promises';

interface ProfileCommand {
  profile: 'start' | 'stop';
  intervalUs?: number;
  path?: string;
}

const session = new Session();
session.connect();

function isCommand(message: unknown): message is ProfileCommand {
  return (
    typeof message === 'object' &&
    message !== null &&
    ((message as { profile?: unknown }).profile === 'start' || (message as { profile?: unknown }).profile === 'stop')
  );
}

process.on('message', (message: unknown) => {
  if (!isCommand(message)) return;
  void (async () => {
    try {
      if (message.profile === 'start') {
        await session.post('Profiler.enable');
        await session.post('Profiler.setSamplingInterval', { interval: message.intervalUs ?? 250 });
        await session.post('Profiler.start');
        process.send?.({ profiling: true });
      } else {
        const { profile } = await session.post('Profiler.stop');
        const path = message.path ?? `gateway-${process.pid}.cpuprofile`;
        await writeFile(path, JSON.stringify(profile));
        process.send?.({ profiled: path });
      }
    } catch (error) {
      process.send?.({ profileError: error instanceof Error ? error.message : String(error) });
    }
  })();
});
// The IPC channel must not keep a finished gateway alive.
process.channel?.unref();

await import('../src/main.js');
