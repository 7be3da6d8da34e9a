import type { ChatCompletionRequest } from '../../libs/openai-contract/src/index.js';
import { GatewayError } from '../core/errors.js';
import { asBody, asObject } from '../core/validate.js';
import { MODEL_ID_PATTERN } from '../routing/routing-table.js';

const TASK_TYPE = /^[a-z0-9][a-z0-9_.-]{0,63}$/i;
/**
 * OpenAI's (and OpenRouter's) ranges. A value outside them is the caller's mistake: answered here,
 * before a fallback chain sends it to every model in turn, and the same on both doors.
 */
const SAMPLING_RANGES = [
  ['temperature', [0, 2]],
  ['top_p', [0, 1]],
] as const;

/**
 * Checks the fields the gateway itself reads, naming the first one that is wrong, and passes
 * every other field through untouched (new OpenAI parameters must keep working).
 */
export function parseChatRequest(raw: unknown): ChatCompletionRequest {
  const body = asBody(raw);
  const messages = body.messages;
  if (messages === undefined || messages === null) throw new GatewayError('missing_field', "Missing required parameter: 'messages'.", { param: 'messages' });
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new GatewayError('invalid_value', "'messages' must be a non-empty array of message objects.", { param: 'messages' });
  }
  messages.forEach((m: unknown, i) => {
    if (typeof m !== 'object' || m === null || Array.isArray(m)) {
      throw new GatewayError('invalid_value', `'messages[${i}]' must be an object.`, { param: `messages[${i}]` });
    }
    const { role, content } = m as { role?: unknown; content?: unknown };
    // OpenAI refuses any other role, and what a caller saw for one depended on the upstream (and
    // a fallback chain tried every model). Only the rules every provider shares are checked here:
    // OpenRouter takes more than OpenAI (an assistant turn without content, a nameless function
    // message, a tool message answering no earlier call), so those stay the upstream's call.
    switch (role) {
      case 'system':
      case 'developer':
      case 'user':
      case 'assistant':
      case 'function':
        break;
      case 'tool': {
        // Without it the result cannot be matched to the call it answers.
        const id = (m as { tool_call_id?: unknown }).tool_call_id;
        if (id === undefined || id === null) {
          throw new GatewayError('missing_field', `Missing required parameter: 'messages[${i}].tool_call_id'.`, { param: `messages[${i}].tool_call_id` });
        }
        if (typeof id !== 'string') {
          throw new GatewayError('invalid_value', `Invalid type for 'messages[${i}].tool_call_id': expected a string.`, {
            param: `messages[${i}].tool_call_id`,
          });
        }
        break;
      }
      case undefined:
      case null:
        throw new GatewayError('missing_field', `Missing required parameter: 'messages[${i}].role'.`, { param: `messages[${i}].role` });
      default:
        throw new GatewayError('invalid_value', `'messages[${i}].role' must be one of 'system', 'developer', 'user', 'assistant', 'tool' or 'function'.`, {
          param: `messages[${i}].role`,
        });
    }
    // Text, a list of parts, or null (an assistant turn that only calls tools).
    if (content !== undefined && content !== null && typeof content !== 'string' && !Array.isArray(content)) {
      throw new GatewayError('invalid_value', `'messages[${i}].content' must be a string or an array of content parts.`, { param: `messages[${i}].content` });
    }
  });
  // null is what some clients send for "not set": like absent and 'auto', routing decides.
  if (body.model === null) delete body.model;
  if (body.model !== undefined) parseModelId(body.model, 'model');
  optionalType(body, 'stream', 'boolean');
  for (const field of ['max_tokens', 'max_completion_tokens'] as const) {
    const v = body[field];
    if (v !== undefined && v !== null && (typeof v !== 'number' || !Number.isInteger(v) || v < 1)) {
      throw new GatewayError('invalid_value', `'${field}' must be a positive integer.`, { param: field });
    }
  }
  for (const [field, [min, max]] of SAMPLING_RANGES) {
    optionalType(body, field, 'number');
    const v = body[field];
    if (typeof v === 'number' && !(v >= min && v <= max)) {
      throw new GatewayError('invalid_value', `'${field}' must be from ${min} to ${max}.`, { param: field });
    }
  }
  if (body.n !== undefined && body.n !== null && (typeof body.n !== 'number' || !Number.isInteger(body.n) || body.n < 1 || body.n > 128)) {
    throw new GatewayError('invalid_value', "'n' must be an integer from 1 to 128 (OpenAI's range).", { param: 'n' });
  }
  if (body.stream_options !== undefined && body.stream_options !== null) {
    optionalType(asObject(body.stream_options, "'stream_options'", 'stream_options'), 'include_usage', 'boolean', 'stream_options.');
  }
  // Passed on, but also read here (token estimate, cache bypass, the audit's end-user label).
  if (body.tools !== undefined && body.tools !== null) {
    if (!Array.isArray(body.tools)) throw new GatewayError('invalid_value', "'tools' must be an array of tool objects.", { param: 'tools' });
    body.tools.forEach((tool: unknown, i) => {
      if (typeof tool !== 'object' || tool === null || Array.isArray(tool)) throw new GatewayError('invalid_value', `'tools[${i}]' must be an object.`, { param: `tools[${i}]` });
    });
  }
  if (body.response_format !== undefined && body.response_format !== null) asObject(body.response_format, "'response_format'", 'response_format');
  optionalType(body, 'user', 'string');
  // null means absent, as for model and models (and as /v1/complete reads it): x-task-type may apply.
  if (body.task_type === null) delete body.task_type;
  if (body.task_type !== undefined) parseTaskType(body.task_type, 'task_type');
  if (body.models === null) delete body.models;
  if (body.models !== undefined) {
    if (
      !Array.isArray(body.models) ||
      body.models.length === 0 ||
      body.models.length > 10 ||
      !body.models.every((m) => typeof m === 'string' && MODEL_ID_PATTERN.test(m))
    ) {
      throw new GatewayError('invalid_value', "'models' must be a list of 1 to 10 model ids (printable ASCII without spaces).", { param: 'models' });
    }
  }
  return body as ChatCompletionRequest;
}

/**
 * A model id a client names: printable ASCII without spaces, 1-200 characters. The name goes
 * upstream and comes back in the `x-gateway-model` header, which cannot carry anything else, so
 * a name outside it is a 400 here rather than a 500 after the call was paid for.
 */
export function parseModelId(value: unknown, param: string): string {
  if (typeof value !== 'string') throw new GatewayError('invalid_value', `Invalid type for '${param}': expected a string.`, { param });
  if (!MODEL_ID_PATTERN.test(value)) {
    throw new GatewayError('invalid_value', `'${param}' must be a model id or 'auto' (1-200 printable ASCII characters without spaces).`, { param });
  }
  return value;
}

export function parseTaskType(value: unknown, param: string): string {
  if (typeof value !== 'string' || !TASK_TYPE.test(value)) {
    throw new GatewayError('invalid_value', `'${param}' must be a task type name such as 'code' or 'general'.`, { param });
  }
  return value;
}

function optionalType(body: Record<string, unknown>, field: string, type: 'string' | 'number' | 'boolean', prefix = ''): void {
  const v = body[field];
  if (v !== undefined && v !== null && typeof v !== type) {
    throw new GatewayError('invalid_value', `Invalid type for '${prefix}${field}': expected a ${type}.`, { param: `${prefix}${field}` });
  }
}
