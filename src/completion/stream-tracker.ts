import { readUsage, type Usage } from '../../libs/openai-contract/src/index.js';

/** Reads what a stream produced: usage when the upstream reports it, else a content count. */
export class StreamTracker {
  usage: Usage | undefined;
  model: string | undefined;
  contentChars = 0;
  readonly payloads: string[] = [];

  /** Returns true when the payload is the usage-only chunk (no choices). */
  observe(payload: string): boolean {
    this.payloads.push(payload);
    let chunk: { model?: unknown; choices?: Array<{ delta?: { content?: unknown } }>; usage?: unknown };
    try {
      chunk = JSON.parse(payload) as typeof chunk;
    } catch {
      return false;
    }
    if (typeof chunk.model === 'string') this.model = chunk.model;
    const choices = chunk.choices;
    if (Array.isArray(choices)) {
      for (const choice of choices) {
        const content = choice.delta?.content;
        if (typeof content === 'string') this.contentChars += content.length;
      }
    }
    const usage = chunk.usage ? readUsage(chunk) : undefined;
    if (usage) this.usage = usage;
    return usage !== undefined && Array.isArray(choices) && choices.length === 0;
  }
}
