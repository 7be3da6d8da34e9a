import { describe, expect, it, vi } from 'vitest';
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

describe('SseParser, split anywhere', () => {
  const stream =
    'data: {"a":1}\n\n' +
    ': keep-alive\r\n\r\n' +
    'data: {"b":"ü€𝄞"}\r\n\r\n' +
    'event: error\ndata: {"message":"boom"}\n\n' +
    'data: {"c":\ndata: 3}\r\n\r\n' +
    'event:ping\r\ndata: {}\r\n\r\n' +
    'data: [DONE]\n\n';
  const expected = ['{"a":1}', '{"b":"ü€𝄞"}', '{"message":"boom"}', '{"c":\n3}', '{}', '[DONE]'];
  const expectedNames = [undefined, undefined, 'error', undefined, 'ping', undefined];

  function parse(pieces: Uint8Array[]): { data: string[]; names: Array<string | undefined> } {
    const parser = new SseParser();
    const data: string[] = [];
    const names: Array<string | undefined> = [];
    const take = (out: string[]) => {
      out.forEach((d, i) => {
        data.push(d);
        names.push(parser.names?.[i]);
      });
    };
    for (const piece of pieces) take(parser.push(piece));
    take(parser.flush());
    return { data, names };
  }

  it('yields the same frames and event names at every split point (CRLF and multi-byte characters included)', () => {
    const bytes = new TextEncoder().encode(stream);
    for (let a = 0; a <= bytes.length; a++) {
      for (const b of [a, a + 1, a + 2, a + 3, bytes.length]) {
        const got = parse([bytes.subarray(0, a), bytes.subarray(a, Math.min(b, bytes.length)), bytes.subarray(Math.min(b, bytes.length))]);
        expect(got.data, `split at ${a}/${b}`).toEqual(expected);
        expect(got.names, `split at ${a}/${b}`).toEqual(expectedNames);
      }
    }
  });

  it('yields the same one byte at a time, and with a large frame held across many pieces', () => {
    const bytes = new TextEncoder().encode(stream);
    expect(parse(Array.from(bytes, (_, i) => bytes.subarray(i, i + 1)))).toEqual({ data: expected, names: expectedNames });
    const large = `{"big":"${'x'.repeat(20_000)}"}`;
    const withLarge = new TextEncoder().encode(`data: ${large}\r\n\r\n${stream}`);
    for (const size of [1000, 4095, 4096, 7]) {
      const pieces: Uint8Array[] = [];
      for (let i = 0; i < withLarge.length; i += size) pieces.push(withLarge.subarray(i, i + size));
      expect(parse(pieces).data, `pieces of ${size}`).toEqual([large, ...expected]);
    }
  });

  it('names no events when no frame has an `event:` line', () => {
    const parser = new SseParser();
    expect(parser.push('event: error\ndata: x\n\n')).toEqual(['x']);
    expect(parser.names).toEqual(['error']);
    expect(parser.push('data: y\n\n')).toEqual(['y']);
    expect(parser.names).toBeUndefined();
  });

  it('searches a large frame arriving in pieces once, not again for each piece', () => {
    // Linear work as a count, not a time: the characters all indexOf calls search. Searching the
    // whole unfinished frame again per piece, as before, searched ~64x the frame's length here.
    const frame = new TextEncoder().encode(`data: {"image":"${'A'.repeat(1024 * 1024)}"}\n\n`);
    const parser = new SseParser();
    const original = Object.getOwnPropertyDescriptor(String.prototype, 'indexOf')?.value as (this: string, search: string, from?: number) => number;
    let searched = 0;
    const spy = vi.spyOn(String.prototype, 'indexOf').mockImplementation(function (this: string, search: string, from?: number) {
      searched += this.length - (from ?? 0);
      return original.call(this, search, from);
    });
    const out: string[] = [];
    try {
      for (let i = 0; i < frame.length; i += 16 * 1024) out.push(...parser.push(frame.subarray(i, i + 16 * 1024)));
    } finally {
      spy.mockRestore();
    }
    expect(out).toHaveLength(1);
    expect(searched).toBeGreaterThan(0);
    expect(searched).toBeLessThan(8 * frame.length);
  });
});
