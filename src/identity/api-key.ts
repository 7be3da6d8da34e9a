import { hash, randomBytes } from 'node:crypto';

// 32 random bytes: guessing is hopeless, so a fast unsalted sha256 is the right hash (a slow KDF
// would cost milliseconds on every request for no gain against brute force).
export function generateApiKey(): string {
  return `gh-${randomBytes(32).toString('base64url')}`;
}

export function hashApiKey(key: string): string {
  return hash('sha256', key, 'hex');
}

export function keyPrefix(key: string): string {
  return key.slice(0, 10);
}
