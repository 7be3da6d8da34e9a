import { describe, expect, it } from 'vitest';
import { encodeCommand, RedisReplyError, type RespReply, RespReader } from './resp-parser.js';

function readAll(chunks: Buffer[]): RespReply[] {
  const reader = new RespReader();
  const replies: RespReply[] = [];
  for (const chunk of chunks) reader.feed(chunk, (reply) => replies.push(reply));
  return replies;
}

// Every reply type the gateway's scripts and commands get back, in one stream.
const WIRE = Buffer.from(
  '+OK\r\n' +
    '-NOSCRIPT No matching script\r\n' +
    ':42\r\n' +
    ':-7\r\n' +
    '$-1\r\n' +
    '$0\r\n\r\n' +
    '$10\r\nnaïve ✓\r\n' +
    '*3\r\n:1\r\n$5\r\nhello\r\n*2\r\n:0\r\n$-1\r\n' +
    '*0\r\n' +
    '*-1\r\n',
);

function expectWireReplies(replies: RespReply[]): void {
  expect(replies).toHaveLength(10);
  expect(replies[0]).toBe('OK');
  expect(replies[1]).toBeInstanceOf(RedisReplyError);
  expect((replies[1] as Error).message).toBe('NOSCRIPT No matching script');
  expect(replies.slice(2)).toEqual([42, -7, null, '', 'naïve ✓', [1, 'hello', [0, null]], [], null]);
}

describe('RespReader', () => {
  it('reads every reply type in order', () => {
    expectWireReplies(readAll([WIRE]));
  });

  it('reads the same replies however the bytes are split (every split point, and byte by byte)', () => {
    for (let at = 1; at < WIRE.length; at++) expectWireReplies(readAll([WIRE.subarray(0, at), WIRE.subarray(at)]));
    expectWireReplies(readAll([...WIRE].map((byte) => Buffer.from([byte]))));
  });

  it('hands out a reply as soon as it is complete, before the next one has arrived', () => {
    const reader = new RespReader();
    const replies: RespReply[] = [];
    reader.feed(Buffer.from(':1\r\n$5\r\nhel'), (reply) => replies.push(reply));
    expect(replies).toEqual([1]);
    reader.feed(Buffer.from('lo\r\n'), (reply) => replies.push(reply));
    expect(replies).toEqual([1, 'hello']);
  });

  it('assembles a large value sent in many chunks intact', () => {
    const value = 'é'.repeat(300_000) + 'tail';
    const wire = Buffer.from(`*2\r\n:1\r\n$${Buffer.byteLength(value)}\r\n${value}\r\n:9\r\n`);
    const chunks: Buffer[] = [];
    for (let at = 0; at < wire.length; at += 65_536) chunks.push(wire.subarray(at, at + 65_536));
    expect(readAll(chunks)).toEqual([[1, value], 9]);
  });

  it('forgets a half-read reply on reset (its connection is gone)', () => {
    const reader = new RespReader();
    const replies: RespReply[] = [];
    reader.feed(Buffer.from('$10\r\nabc'), (reply) => replies.push(reply));
    reader.reset();
    reader.feed(Buffer.from('+PONG\r\n'), (reply) => replies.push(reply));
    expect(replies).toEqual(['PONG']);
  });

  it('refuses bytes that are not RESP', () => {
    expect(() => readAll([Buffer.from('HTTP/1.1 400 Bad Request\r\n')])).toThrow(/unexpected RESP type/);
    expect(() => readAll([Buffer.from(':4x\r\n')])).toThrow(/malformed RESP integer/);
  });
});

describe('encodeCommand', () => {
  it('writes a command as an array of bulk strings, lengths in bytes', () => {
    expect(encodeCommand(['SET', 'k', 'ü', 1500])).toBe('*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nü\r\n$4\r\n1500\r\n');
  });
});
