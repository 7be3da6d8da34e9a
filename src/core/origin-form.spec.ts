import { describe, expect, it } from 'vitest';
import { originForm } from './origin-form.js';

describe('originForm', () => {
  it.each([
    ['/admin/keys', '/admin/keys'],
    ['/v1/models?x=1', '/v1/models?x=1'],
    ['http://gw.internal:8080/admin/departments', '/admin/departments'],
    ['HTTPS://gw.internal/v1/chat/completions?a=b', '/v1/chat/completions?a=b'],
    ['http://user@gw.internal/admin/keys/1', '/admin/keys/1'],
    ['http://gw.internal', '/'],
    ['http://gw.internal?x=1', '/?x=1'],
    ['*', '*'],
    ['admin/keys', 'admin/keys'],
  ])('%s → %s', (url, expected) => {
    expect(originForm(url)).toBe(expected);
  });
});
