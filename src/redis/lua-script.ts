import { hash } from 'node:crypto';
import type { RedisCommands } from './resp-client.js';

/**
 * A Lua script run by EVALSHA, falling back to EVAL once when the server does not know it yet
 * (first use, or after a Redis restart). Each script is one atomic round trip: that is how the
 * rate limiter and the cache avoid read-then-write races between instances.
 */
export class LuaScript {
  readonly sha: string;

  constructor(
    readonly source: string,
    readonly name: string,
  ) {
    this.sha = hash('sha1', source, 'hex');
  }

  /**
   * Runs the script when nobody needs its reply: without one where the connection can skip it
   * (EVAL with the source, since a skipped EVALSHA after a SCRIPT FLUSH would fail unseen),
   * else as `run`. Resolves once sent (or, without skipping, answered); rejects when it could not
   * be sent, or when Redis refused it and said so (only without skipping).
   */
  async fire(client: RedisCommands, keys: readonly string[], args: ReadonlyArray<string | number>): Promise<void> {
    if (client.fire && client.skipsReplies) {
      client.fire('EVAL', this.source, keys.length, ...keys, ...args);
      return;
    }
    await this.run(client, keys, args);
  }

  async run(client: RedisCommands, keys: readonly string[], args: ReadonlyArray<string | number>): Promise<unknown> {
    try {
      return await client.call('EVALSHA', this.sha, keys.length, ...keys, ...args);
    } catch (error) {
      if (!(error instanceof Error) || !error.message.startsWith('NOSCRIPT')) throw error;
      return client.call('EVAL', this.source, keys.length, ...keys, ...args);
    }
  }
}
