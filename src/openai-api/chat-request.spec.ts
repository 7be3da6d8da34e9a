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
