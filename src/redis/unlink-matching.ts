import type { RedisCommands } from './resp-client.js';

/**
 * `literal` as a SCAN MATCH pattern that matches only itself. A key prefix comes from
 * REDIS_KEY_PREFIX, where `[`, `]`, `*`, `?` and `\` are plain characters: unescaped, `[eu]:`
 * matched no key of its own (a purge deleted nothing) and `*` could reach another deployment's.
 */
export function escapeGlob(literal: string): string {
  return literal.replace(/[*?[\]\\]/g, (c) => `\\${c}`);
}

/**
 * UNLINKs every key matching `pattern` (build it with escapeGlob around any literal part), one
 * SCAN page (up to 1000 keys) at a time, so a large namespace never blocks Redis the way KEYS or
 * one huge DEL would. Returns how many keys it removed.
 */
export async function unlinkMatching(client: RedisCommands, pattern: string): Promise<number> {
  let cursor = '0';
  let unlinked = 0;
  do {
    const [next, keys] = (await client.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)) as [string, string[]];
    cursor = next;
    // Counted by UNLINK's reply: SCAN may return a key twice, or one that has since expired.
    if (keys.length > 0) unlinked += (await client.call('UNLINK', ...keys)) as number;
  } while (cursor !== '0');
  return unlinked;
}
