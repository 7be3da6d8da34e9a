/** A server error reply (`-ERR …`, `-NOSCRIPT …`): it fails its own command, not the connection. */
export class RedisReplyError extends Error {
  override readonly name = 'RedisReplyError';
}

export type RespReply = string | number | null | RedisReplyError | RespReply[];

const CR = 13;

/**
 * Incremental RESP2 reply reader. Bytes go in as the socket delivers them, whole replies come out
 * in order. A reply cut across chunks waits for the rest; a large bulk value (a cached answer of a
 * few hundred KB) is not re-parsed for every chunk: the reader remembers how many bytes the
 * pending reply needs at least and joins the chunks once, when they are there.
 */
export class RespReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Bytes the reply at the head needs before another parse attempt can succeed. */
  private need = 0;
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;

  /** Feeds `chunk` and calls `onReply` for every reply it completes. */
  feed(chunk: Buffer, onReply: (reply: RespReply) => void): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered < this.need) return;
    this.buf = this.chunks.length === 1 ? chunk : Buffer.concat(this.chunks, this.buffered);
    this.chunks = [];
    this.buffered = 0;
    this.need = 0;
    this.pos = 0;
    const end = this.buf.length;
    while (this.pos < end) {
      const start = this.pos;
      const reply = this.read();
      if (reply === INCOMPLETE) {
        // Keep the unread tail; `need` was raised by whichever read ran short.
        const rest = this.buf.subarray(start);
        this.chunks.push(rest);
        this.buffered = rest.length;
        this.need = Math.max(this.need - start, rest.length + 1);
        break;
      }
      onReply(reply);
    }
    this.buf = EMPTY;
  }

  /** Drops whatever was half-read (the connection it came from is gone). */
  reset(): void {
    this.chunks = [];
    this.buffered = 0;
    this.need = 0;
    this.buf = EMPTY;
    this.pos = 0;
  }

  private read(): RespReply | typeof INCOMPLETE {
    const buf = this.buf;
    const at = this.pos;
    const type = buf[at];
    const lineEnd = buf.indexOf(CR, at + 1);
    if (lineEnd < 0 || lineEnd + 1 >= buf.length) {
      this.need = buf.length + 1;
      return INCOMPLETE;
    }
    const next = lineEnd + 2;
    switch (type) {
      case 0x2b: // + simple string
        this.pos = next;
        return buf.toString('utf8', at + 1, lineEnd);
      case 0x2d: // - error
        this.pos = next;
        return new RedisReplyError(buf.toString('utf8', at + 1, lineEnd));
      case 0x3a: // : integer
        this.pos = next;
        return readInteger(buf, at + 1, lineEnd);
      case 0x24: {
        // $ bulk string
        const length = readInteger(buf, at + 1, lineEnd);
        if (length < 0) {
          this.pos = next;
          return null;
        }
        const valueEnd = next + length;
        if (valueEnd + 2 > buf.length) {
          this.need = valueEnd + 2;
          return INCOMPLETE;
        }
        this.pos = valueEnd + 2;
        return buf.toString('utf8', next, valueEnd);
      }
      case 0x2a: {
        // * array
        const count = readInteger(buf, at + 1, lineEnd);
        this.pos = next;
        if (count < 0) return null;
        const items: RespReply[] = new Array<RespReply>(count);
        for (let i = 0; i < count; i++) {
          if (this.pos >= buf.length) {
            this.need = buf.length + 1;
            return INCOMPLETE;
          }
          const item = this.read();
          if (item === INCOMPLETE) return INCOMPLETE;
          items[i] = item;
        }
        return items;
      }
      default:
        throw new Error(`unexpected RESP type byte 0x${(type ?? 0).toString(16)}`);
    }
  }
}

const INCOMPLETE = Symbol('incomplete');

/** The decimal integer in `buf[from, to)` (RESP lengths, counts and integer replies). */
function readInteger(buf: Buffer, from: number, to: number): number {
  let i = from;
  const negative = buf[i] === 0x2d;
  if (negative) i += 1;
  let value = 0;
  for (; i < to; i++) {
    const digit = buf[i] - 0x30;
    if (digit < 0 || digit > 9) throw new Error('malformed RESP integer');
    value = value * 10 + digit;
  }
  return negative ? -value : value;
}
const EMPTY = Buffer.alloc(0);

/** One command in RESP's request form (an array of bulk strings), ready to write. */
export function encodeCommand(args: ReadonlyArray<string | number>): string {
  let out = `*${args.length}\r\n`;
  for (const arg of args) {
    const text = typeof arg === 'string' ? arg : String(arg);
    out += `$${Buffer.byteLength(text)}\r\n${text}\r\n`;
  }
  return out;
}
