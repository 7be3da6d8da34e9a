import { hash, randomBytes } from 'node:crypto';

// 32 random bytes: guessing is hopeless, so a fast unsalted sha256 is the right hash (a slow KDF
// would cost milliseconds on every request for no gain against brute force).
export function generateApiKey(): string {
  return `gh-${randomBytes(32).toString('base64url')}`;
}

export function hashApiKey(key: string): string {
  return hash('sha256', key, 'hex');
}

/**
 * The part of a key shown to people (key listings, log lines, audit rows of failed attempts):
 * enough to tell keys apart, never most of a secret. Ten characters of a generated key (46) show
 * seven random ones; of a short key chosen by hand (ADMIN_API_KEY may have 16), or whatever
 * someone presented by mistake, at most a quarter.
 */
export function keyPrefix(key: string): string {
  return key.slice(0, Math.min(10, Math.floor(key.length / 4)));
}
