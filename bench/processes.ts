/**
 * Child processes of the benchmark: the stub upstream, the floor proxies, the gateways and the
 * load generator each run in their own node process (node itself, never npm, so the pid whose
 * CPU is read is the process that serves).
 */
import { type ChildProcess, fork, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { LoadResult, LoadSpec } from './load.js';
import type { LoadReplyMessage, LoadRequestMessage } from './load-worker.js';

/** Paths of the compiled entry points, relative to this file in dist/bench. */
export const ENTRY = {
  stub: fileURLToPath(new URL('../libs/stub-upstream/src/main.js', import.meta.url)),
  // What `npm start` runs: the bundle scripts/bundle.mjs makes of dist/src (see there for why).
  gateway: fileURLToPath(new URL('../bundle/main.js', import.meta.url)),
  profiledGateway: fileURLToPath(new URL('./profiled-gateway.js', import.meta.url)),
  floor: fileURLToPath(new URL('./floor-proxy-main.js', import.meta.url)),
  loadWorker: fileURLToPath(new URL('./load-worker.js', import.meta.url)),
};

const STDERR_TAIL = 4000;

export class NodeProcess {
  private stderr = '';
  private stdout = '';
  /** The first line the process printed on stdout (the stub and the floor announce their URL so). */
  readonly firstLine: Promise<string>;
  private exited: Promise<number | null>;
  /** undefined while running; the exit code (-1 for a signal) once it has exited. */
  exitCode: number | null | undefined;
  /** The signal that ended it, if one did (a process killed from outside shows up here). */
  exitSignal: NodeJS.Signals | null = null;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-STDERR_TAIL);
    });
    // Always drained: the gateway logs to stdout, and a full pipe would make its async logger
    // buffer in memory (inflating RSS) or stall it.
    let firstLineSeen = false;
    let resolveFirstLine: (line: string) => void = () => undefined;
    this.firstLine = new Promise((resolve) => (resolveFirstLine = resolve));
    let head = '';
    child.stdout?.setEncoding('utf8');
    child.stdout?.on('data', (chunk: string) => {
      this.stdout = (this.stdout + chunk).slice(-STDERR_TAIL);
      if (firstLineSeen) return;
      head += chunk;
      const newline = head.indexOf('\n');
      if (newline !== -1) {
        firstLineSeen = true;
        resolveFirstLine(head.slice(0, newline));
      }
    });
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitSignal = signal;
        this.exitCode = code ?? (signal ? -1 : null);
        resolve(this.exitCode);
      });
    });
  }

  get pid(): number {
    if (this.child.pid === undefined) throw new Error(`${this.name} has no pid (did it start?)`);
    return this.child.pid;
  }

  get alive(): boolean {
    return this.exitCode === undefined;
  }

  /** The end of what it printed (stderr, then stdout: the gateway's logs go to stdout). */
  stderrTail(): string {
    const out = this.stdout.trim();
    return [this.stderr.trim(), out ? `stdout: …${out.slice(-1500)}` : ''].filter(Boolean).join('\n');
  }

  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.alive) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  /** Rejects as soon as the process exits (used to race start-up waits). */
  exitAsError(): Promise<never> {
    return this.exited.then((code) => {
      throw new Error(`${this.name} exited early (code ${String(code)})${this.stderr ? `:\n${this.stderrTail()}` : ''}`);
    });
  }
}

export interface SpawnOptions {
  env?: NodeJS.ProcessEnv;
  nodeFlags?: string[];
  ipc?: boolean;
}

/**
 * `env` without NODE_OPTIONS: the bench passes the node flags it measures explicitly, and a heap
 * cap or profiler flag from the caller's shell would change the figures without being recorded.
 */
function measuredEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const copy = { ...env };
  delete copy.NODE_OPTIONS;
  return copy;
}

export function spawnNode(name: string, script: string, args: string[], options: SpawnOptions = {}): NodeProcess {
  const child = spawn(process.execPath, [...(options.nodeFlags ?? []), script, ...args], {
    env: measuredEnv(options.env ?? process.env),
    stdio: options.ipc ? ['ignore', 'pipe', 'pipe', 'ipc'] : ['ignore', 'pipe', 'pipe'],
  });
  return new NodeProcess(name, child);
}

/** Waits for the first stdout line and parses it as JSON (the stub and floor announce their URL so). */
export async function firstJsonLine<T>(proc: NodeProcess, timeoutMs = 15_000): Promise<T> {
  const text = await withTimeout(Promise.race([proc.firstLine, proc.exitAsError()]), timeoutMs, `${proc.name} did not announce itself`);
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new Error(`${proc.name} printed something that is not JSON: ${text.slice(0, 200)}`);
  }
}

export async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** A free loopback port (for processes that cannot announce the port they bound). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Polls `url` until it answers 200, racing the process's exit. */
export async function waitForHttp200(proc: NodeProcess, url: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: string;
  for (;;) {
    if (!proc.alive) await proc.exitAsError();
    try {
      const res = await fetch(url);
      await res.arrayBuffer();
      if (res.status === 200) return;
      last = `HTTP ${res.status}`;
    } catch (error) {
      last = error instanceof Error ? error.message : String(error);
    }
    if (Date.now() > deadline) throw new Error(`${proc.name} not ready at ${url} within ${timeoutMs} ms (last: ${last})\n${proc.stderrTail()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export type LoadRunner = (spec: LoadSpec) => Promise<LoadResult>;

/** The load generator's child process; one spec at a time. */
export class LoadWorker {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (r: LoadResult) => void; reject: (e: Error) => void }>();
  private readonly proc: NodeProcess;

  constructor() {
    // Advanced serialization moves the latency arrays as structured clones, not JSON text.
    const child = fork(ENTRY.loadWorker, [], { env: measuredEnv(process.env), serialization: 'advanced', stdio: ['ignore', 'inherit', 'pipe', 'ipc'] });
    this.proc = new NodeProcess('load generator', child);
    child.on('message', (message: LoadReplyMessage) => {
      const waiter = this.pending.get(message.id);
      if (!waiter) return;
      this.pending.delete(message.id);
      if ('result' in message) waiter.resolve(message.result);
      else waiter.reject(new Error(`load generator failed: ${message.error}`));
    });
    child.once('exit', (code) => {
      for (const waiter of this.pending.values()) waiter.reject(new Error(`load generator exited (code ${String(code)}): ${this.proc.stderrTail()}`));
      this.pending.clear();
    });
  }

  readonly run: LoadRunner = (spec) =>
    new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.proc.child.send({ id, spec } satisfies LoadRequestMessage);
    });

  async stop(): Promise<void> {
    if (this.proc.child.connected) this.proc.child.disconnect();
    await this.proc.stop();
  }
}
