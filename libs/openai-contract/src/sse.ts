/**
 * Server-Sent Events as OpenAI sends them: `data: <json>\n\n` frames ending with `data: [DONE]`.
 * The parser is incremental because upstream TCP chunks split frames anywhere, including inside
 * a multi-byte UTF-8 character (hence the TextDecoder in stream mode).
 */
export const SSE_DONE = 'data: [DONE]\n\n';

export function sseData(payload: string): string {
  return `data: ${payload}\n\n`;
}

export class SseParser {
  /**
   * The unfinished frame's text, in the pieces it arrived in: none of them, nor where they meet,
   * holds a frame end. Joined only when one arrives, so a large event (a base64 image delta in
   * hundreds of TLS records) is searched and copied once, not once per piece.
   */
  private readonly pending: string[] = [];
  private pendingLength = 0;
  private readonly decoder = new TextDecoder('utf-8');

  /**
   * The `event:` names of the payloads the last push() or flush() returned, by index: undefined
   * when none of those frames named one (OpenAI names none; an upstream may send `event: error`).
   */
  names: Array<string | undefined> | undefined;

  /** Characters of the frame not finished yet (a reader caps what one event may hold). */
  get unfinishedLength(): number {
    return this.pendingLength;
  }

  /** Feeds raw bytes; returns the `data` payloads of every frame completed by them. */
  push(chunk: Uint8Array | string): string[] {
    let text = typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
    this.names = undefined;
    const pending = this.pending;
    if (pending.length > 0) {
      // A small unfinished frame (an event split across two reads) is joined and searched again
      // whole: cheaper than the checks below, and bounded.
      if (this.pendingLength >= JOIN_BELOW && !endsFrame(tailOf(pending), text)) {
        pending.push(text);
        this.pendingLength += text.length;
        return [];
      }
      text = pending.length === 1 ? pending[0] + text : pending.join('') + text;
      pending.length = 0;
      this.pendingLength = 0;
    }
    const out: string[] = [];
    // Frames end with a blank line; accept \r\n line ends as the SSE spec allows. Each terminator
    // is searched for again only once the frames consumed pass it: a burst of many small events
    // without a single \r\n\r\n would otherwise rescan the rest of the burst for it per event.
    let start = 0;
    let lf = text.indexOf('\n\n');
    let crlf = text.indexOf('\r\n\r\n');
    for (;;) {
      if (lf !== -1 && lf < start) lf = text.indexOf('\n\n', start);
      if (crlf !== -1 && crlf < start) crlf = text.indexOf('\r\n\r\n', start);
      let end = lf;
      let sepLen = 2;
      if (crlf !== -1 && (end === -1 || crlf < end)) {
        end = crlf;
        sepLen = 4;
      }
      if (end === -1) break;
      this.frame(text.slice(start, end), out);
      start = end + sepLen;
    }
    if (start < text.length) {
      const rest = start === 0 ? text : text.slice(start);
      pending.push(rest);
      this.pendingLength = rest.length;
    }
    return out;
  }

  /** Whatever is left when the stream ended without a closing blank line. */
  flush(): string[] {
    const rest = this.pending.join('') + this.decoder.decode();
    this.pending.length = 0;
    this.pendingLength = 0;
    this.names = undefined;
    const out: string[] = [];
    if (rest.trim()) this.frame(rest, out);
    return out;
  }

  /** Adds the frame's `data` to `out` (and its `event` name to `names`), if it has any data. */
  private frame(frame: string, out: string[]): void {
    // Nearly every frame is one `data:` line: no split, no event name.
    if (frame.startsWith('data:') && frame.indexOf('\n') === -1) {
      out.push(fieldValue(frame.endsWith('\r') ? frame.slice(0, -1) : frame, 5));
      return;
    }
    let data: string | undefined;
    let event: string | undefined;
    for (const raw of frame.split('\n')) {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      // Lines starting with ':' are comments (OpenRouter sends ": OPENROUTER PROCESSING" keep-alives).
      if (!line.startsWith('data:')) {
        if (line.startsWith('event:')) event = fieldValue(line, 6);
        continue;
      }
      const value = fieldValue(line, 5);
      data = data === undefined ? value : `${data}\n${value}`;
    }
    if (data === undefined) return;
    if (event !== undefined) (this.names ??= [])[out.length] = event;
    out.push(data);
  }
}

/** A field's value: what follows its colon, less one leading space. */
function fieldValue(line: string, colon: number): string {
  return line.charCodeAt(colon) === 32 ? line.slice(colon + 1) : line.slice(colon);
}

/** Unfinished frames shorter than this are searched again whole when more text arrives. */
const JOIN_BELOW = 4096;

/** The last (up to) three characters of the pieces, where a `\r\n\r\n` may have begun. */
function tailOf(pieces: string[]): string {
  let tail = '';
  for (let i = pieces.length - 1; i >= 0 && tail.length < 3; i--) tail = pieces[i] + tail;
  return tail.slice(-3);
}

/**
 * Whether `text`, arriving after an unfinished frame that ends in `tail`, ends that frame: a
 * terminator inside `text`, or one begun in the tail (`\n` + `\n`, `\r\n\r` + `\n`, ...).
 */
function endsFrame(tail: string, text: string): boolean {
  if (text.indexOf('\n\n') !== -1 || text.indexOf('\r\n\r\n') !== -1) return true;
  const seam = tail + text.slice(0, 3);
  return seam.indexOf('\n\n') !== -1 || seam.indexOf('\r\n\r\n') !== -1;
}
