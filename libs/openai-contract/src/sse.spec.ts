import { describe, expect, it } from 'vitest';
import { SseParser, sseData } from './sse.js';

describe('SseParser', () => {
  it('reassembles frames split at arbitrary bytes, including inside a UTF-8 character', () => {
    const text = sseData('{"a":"héllo"}') + ': keep-alive\n\n' + sseData('[DONE]');
    const bytes = new TextEncoder().encode(text);
    const parser = new SseParser();
    const out: string[] = [];
    for (let i = 0; i < bytes.length; i += 3) out.push(...parser.push(bytes.subarray(i, i + 3)));
    out.push(...parser.flush());
    expect(out).toEqual(['{"a":"héllo"}', '[DONE]']);
  });

  it('accepts CRLF line endings and data without a space', () => {
    const parser = new SseParser();
    expect(parser.push('data:{"x":1}\r\n\r\ndata: 2\n\n')).toEqual(['{"x":1}', '2']);
  });

  it('returns a trailing frame without blank line on flush', () => {
    const parser = new SseParser();
    expect(parser.push('data: {"cut":true}')).toEqual([]);
    expect(parser.flush()).toEqual(['{"cut":true}']);
  });
});
