import { describe, expect, it } from 'vitest';
import { generateApiKey, keyPrefix } from './api-key.js';

describe('keyPrefix', () => {
  it('shows ten characters of a generated key, and at most a quarter of a short one', () => {
    const key = generateApiKey();
    expect(keyPrefix(key)).toBe(key.slice(0, 10));
    expect(keyPrefix('sixteen-chars-ok')).toBe('sixt');
    expect(keyPrefix('sk-or-v1-0123456789abcdef0123456789abcdef')).toBe('sk-or-v1-0');
    expect(keyPrefix('short')).toBe('s');
    expect(keyPrefix('abc')).toBe('');
  });
});
