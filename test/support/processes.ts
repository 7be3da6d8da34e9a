import { spawn } from 'node:child_process';

/** A process that is alive until stopped (a lock's owner that still runs). */
export async function otherLiveProcess(): Promise<{ pid: number; stop(): void }> {
  const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
  await new Promise((resolve) => child.once('spawn', resolve));
  return { pid: child.pid as number, stop: () => child.kill('SIGKILL') };
}

/** The pid of a process that has exited (a lock's owner that died). */
export async function exitedPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
  await new Promise((resolve) => child.once('exit', resolve));
  return child.pid as number;
}
