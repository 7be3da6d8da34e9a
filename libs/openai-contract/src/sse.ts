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
  private buffer = '';
  private readonly decoder = new TextDecoder('utf-8');

  /** Feeds raw bytes; returns the `data` payloads of every frame completed by them. */
  push(chunk: Uint8Array | string): string[] {
    this.buffer += typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
    const out: string[] = [];
    for (;;) {
      // Frames end with a blank line; accept \r\n line ends as the SSE spec allows.
      let end = this.buffer.indexOf('\n\n');
      let sepLen = 2;
      const crlf = this.buffer.indexOf('\r\n\r\n');
      if (crlf !== -1 && (end === -1 || crlf < end)) {
        end = crlf;
        sepLen = 4;
      }
      if (end === -1) break;
      const frame = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + sepLen);
      const data = frameData(frame);
      if (data !== undefined) out.push(data);
    }
    return out;
  }

  /** Whatever is left when the stream ended without a closing blank line. */
  flush(): string[] {
    const rest = this.buffer + this.decoder.decode();
    this.buffer = '';
    const data = rest.trim() ? frameData(rest) : undefined;
    return data === undefined ? [] : [data];
  }
}

function frameData(frame: string): string | undefined {
  let data: string | undefined;
  for (const raw of frame.split('\n')) {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    // Lines starting with ':' are comments (OpenRouter sends ": OPENROUTER PROCESSING" keep-alives).
    if (!line.startsWith('data:')) continue;
    const value = line.charCodeAt(5) === 32 ? line.slice(6) : line.slice(5);
    data = data === undefined ? value : `${data}\n${value}`;
  }
  return data;
}
