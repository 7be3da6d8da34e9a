import { describe, expect, it } from 'vitest';
import { GatewayError } from '../core/errors.js';
import { parseChatRequest } from './chat-request.js';

const messages = [{ role: 'user', content: 'hi' }];

function refusal(body: Record<string, unknown>): { code: string; param: string | null } {
  try {
    parseChatRequest({ messages, ...body });
  } catch (error) {
    if (error instanceof GatewayError) return { code: error.code, param: error.toEnvelope().error.param };
    throw error;
  }
  throw new Error(`accepted: ${JSON.stringify(body)}`);
}

describe('parseChatRequest: model ids', () => {
  it.each(['openai/gpt-4o-mini-模型', 'openai/gpt-4o-mini\u00e9', 'a b', 'tab\there', 'line\nbreak', '\u0000', 'x'.repeat(201), ''])(
    'refuses model %j with 400 invalid_value, param model',
    (model) => {
      expect(refusal({ model })).toEqual({ code: 'invalid_value', param: 'model' });
    },
  );

  it('refuses a models entry that is not printable ASCII, param models', () => {
    expect(refusal({ models: ['openai/gpt-4o-mini', 'anthropic/模型'] })).toEqual({ code: 'invalid_value', param: 'models' });
    expect(refusal({ models: ['with space'] })).toEqual({ code: 'invalid_value', param: 'models' });
  });

  it('accepts ordinary ids and auto', () => {
    for (const model of ['auto', 'openai/gpt-4o-mini', 'meta-llama/llama-3.1-8b-instruct:free', 'x'.repeat(200)]) {
      expect(parseChatRequest({ messages, model, models: ['anthropic/claude-3.5-sonnet', 'openai/gpt-4o'] }).model).toBe(model);
    }
  });

  it('treats model: null like an absent model (routing decides)', () => {
    const body = parseChatRequest({ messages, model: null });
    expect(body.model).toBeUndefined();
    expect('model' in body).toBe(false);
  });

  it('treats models: null like absent', () => {
    expect('models' in parseChatRequest({ messages, models: null })).toBe(false);
  });

  it('still refuses a model of the wrong type', () => {
    expect(refusal({ model: 42 })).toEqual({ code: 'invalid_value', param: 'model' });
  });
});

describe('parseChatRequest: sampling parameters', () => {
  it('refuses a temperature or top_p outside its range, or of the wrong type, naming it', () => {
    expect(refusal({ temperature: 2.5 })).toEqual({ code: 'invalid_value', param: 'temperature' });
    expect(refusal({ temperature: -0.1 })).toEqual({ code: 'invalid_value', param: 'temperature' });
    expect(refusal({ temperature: '0.9' })).toEqual({ code: 'invalid_value', param: 'temperature' });
    expect(refusal({ top_p: 1.5 })).toEqual({ code: 'invalid_value', param: 'top_p' });
  });

  it('accepts the ends of each range, and null as not set', () => {
    for (const body of [{ temperature: 0 }, { temperature: 2 }, { top_p: 0 }, { top_p: 1 }, { temperature: null, top_p: null }]) {
      expect(() => parseChatRequest({ messages, ...body })).not.toThrow();
    }
  });
});

// OpenAI answers these with a 400; relayed blindly, what the caller saw depended on the upstream
// (and a fallback chain would send the bad request to every model in turn).
describe('parseChatRequest: message roles', () => {
  const refusedMessages = (list: unknown[]) => refusal({ messages: list });

  // A one-element array is wrapped: it.each would spread it into the role itself.
  it.each(['wizard', '', 'User', 'tools', 5, true, {}, [['user']]])('refuses role %j with 400 invalid_value, param messages[i].role', (role) => {
    const list = [
      { role: 'user', content: 'x' },
      { role, content: 'x' },
    ];
    expect(refusedMessages(list)).toEqual({ code: 'invalid_value', param: 'messages[1].role' });
  });

  it('treats a missing (or null) role as a missing field', () => {
    expect(refusedMessages([{ content: 'x' }])).toEqual({ code: 'missing_field', param: 'messages[0].role' });
    expect(refusedMessages([{ role: null, content: 'x' }])).toEqual({ code: 'missing_field', param: 'messages[0].role' });
  });

  it('accepts every role OpenAI accepts, including the deprecated function', () => {
    const all = [
      { role: 'system', content: 's' },
      { role: 'developer', content: 'd' },
      { role: 'user', content: 'u' },
      { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: 'done' },
      { role: 'assistant', content: null, function_call: { name: 'g', arguments: '{}' } },
      { role: 'function', name: 'g', content: '{}' },
    ];
    expect(() => parseChatRequest({ messages: all })).not.toThrow();
  });

  it('requires a tool message to name the call it answers with a string tool_call_id', () => {
    expect(refusedMessages([{ role: 'tool', content: 'done' }])).toEqual({ code: 'missing_field', param: 'messages[0].tool_call_id' });
    expect(refusedMessages([{ role: 'tool', tool_call_id: null, content: 'done' }])).toEqual({ code: 'missing_field', param: 'messages[0].tool_call_id' });
    expect(refusedMessages([{ role: 'tool', tool_call_id: 7, content: 'done' }])).toEqual({ code: 'invalid_value', param: 'messages[0].tool_call_id' });
  });

  it('leaves other role-specific rules to the upstream (OpenRouter is more lenient than OpenAI)', () => {
    // An assistant turn without content or tool calls, a function message without a name, a tool
    // message that answers no earlier call: some providers behind OpenRouter take them.
    for (const m of [{ role: 'assistant' }, { role: 'function', content: '{}' }, { role: 'user', content: 'x', name: 'alice' }]) {
      expect(() => parseChatRequest({ messages: [m] }), JSON.stringify(m)).not.toThrow();
    }
    expect(() => parseChatRequest({ messages: [{ role: 'tool', tool_call_id: 'orphan', content: 'x' }] })).not.toThrow();
  });
});
