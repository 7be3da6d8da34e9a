import type { RedisCommands } from './resp-client.js';

/**
 * UNLINKs every key matching `pattern`, one SCAN page (up to 1000 keys) at a time, so a large
 * namespace never blocks Redis the way KEYS or one huge DEL would. Returns how many of the
 * unlinked keys `counts` accepts (all by default).
 */
export async function unlinkMatching(client: RedisCommands, pattern: string, counts: (key: string) => boolean = () => true): Promise<number> {
  let cursor = '0';
  let unlinked = 0;
  do {
    const [next, keys] = (await client.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)) as [string, string[]];
    cursor = next;
    if (keys.length > 0) {
      await client.call('UNLINK', ...keys);
      unlinked += keys.filter(counts).length;
    }
  } while (cursor !== '0');
  return unlinked;
}
