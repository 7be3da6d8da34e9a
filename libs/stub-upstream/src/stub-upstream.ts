/**
 * A loopback HTTP server that speaks the OpenAI / OpenRouter chat completions API, with
 * switchable faults (latency, error statuses, broken JSON, cut streams, hangs).
 *
 * Three consumers shape this file:
 *  - the gateway's tests, which need deterministic answers and precise fault control;
 *  - the load benchmark, which needs the stub never to be the bottleneck — hence plain
 *    `node:http`, one JSON.stringify per JSON answer, precomputed static bodies, and no
 *    timers or extra listeners unless a fault asks for them (an SSE answer's one 'finish'
 *    callback, for `streamsFinished`, aside);
 *  - the gateway's in-process "mock upstream" mode — hence no imports from `src/` and
 *    no Nest: this module only depends on Node built-ins.
 */
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

// ---------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------

export interface StubFaults {
  /** Delay before the response headers (and before the first SSE chunk). */
  latencyMs?: number;
  /** Delay between SSE chunks. */
  chunkDelayMs?: number;
  /** Answer with this HTTP error status in the OpenAI error envelope. */
  status?: number;
  /** With `status` (esp. 429): sets the `retry-after` header. */
  retryAfterSeconds?: number;
  /** Apply `status` only to the first N matching requests (counted per model), then answer normally. */
  failTimes?: number;
  /** 200 with a body that is not valid JSON (for streams: an SSE frame with broken JSON). */
  malformedJson?: boolean;
  /** 200 and valid JSON with no answer in it: a choice without `message`; for streams, [DONE] before any event. */
  emptyAnswer?: boolean;
  /** SSE: destroy the socket after N `data:` frames (the role frame counts), never sending [DONE]. */
  cutAfterChunks?: number;
  /** Read the request, then send nothing for this long (for timeout tests); answers normally afterwards. */
  hangMs?: number;
  /** Leave `usage.cost` out so callers must price from tokens. */
  omitCost?: boolean;
  /** Force the completion token count (the reply is padded or cut to exactly this many words). */
  completionTokens?: number;
  /** Pad every word of the reply to this many characters (filler letters): a long answer in bytes, same token count. */
  wordBytes?: number;
  /**
   * Answer 200 and carry the error (`status`, or 502) in the body, as OpenRouter does once a model
   * started processing: JSON `{"error":{"code":<status>,"message"}}`; a stream whose first event
   * is that error (with a choice whose finish_reason is "error"), then [DONE].
   */
  errorInBody?: boolean;
  /**
   * An error mid-generation (code 502): a stream sends N `data:` frames (the role frame counts), then an
   * error event with a choice whose finish_reason is "error", then [DONE]; JSON answers 200 with the
   * first N words as the content, finish_reason "error" and a top-level `error`.
   */
  errorAfterChunks?: number;
  /**
   * SSE: after N `data:` frames (the role frame counts), one frame that opens and closes like a JSON
   * object but is broken inside (a trailing comma), then the rest of the stream as usual. What a
   * relay that checks only an event's outline would pass on to its client.
   */
  malformedAfterChunks?: number;
  /**
   * With `errorAfterChunks`, JSON only: the error sits inside the choice (`choices[0].error`)
   * and the body has no top-level `error`, the other shape OpenRouter gives a provider's failure.
   */
  errorInChoice?: boolean;
  /** With `status` (403): OpenRouter's moderation refusal, the flagged input described in `error.metadata`. */
  flagged?: boolean;
  /**
   * After the headers, only keep-alives for this long (SSE comments `: OPENROUTER PROCESSING`, or
   * whitespace before a JSON body, every 50 ms, as OpenRouter sends while a model is slow), then the answer.
   */
  processingMs?: number;
  /** The `model` the answer names instead of the model asked (OpenRouter names dated versions: `openai/gpt-4o-mini-2024-07-18`). */
  answerModel?: string;
  /** Successful answers and every stream chunk carry `"error": null`, as some OpenRouter providers send: no error at all. */
  errorNull?: boolean;
  /**
   * An id OpenRouter does not know (retired, renamed, misspelt): a request naming it, as `model` or
   * anywhere in `models`, is refused as a whole before any model is tried, the way OpenRouter does:
   * HTTP 400 `{"error":{"message":"<id> is not a valid model ID","code":400}}`, not a 404.
   */
  invalidModelId?: boolean;
}

export interface StubConfig extends StubFaults {
  /** Per-model overrides; a key set here wins over the same key set globally. */
  models?: Record<string, StubFaults>;
}

export interface StubRequestRecord {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  /** Parsed JSON body, or the raw text when the body was not valid JSON. */
  body: unknown;
  /** Epoch milliseconds at which the body was fully received. */
  at: number;
}

/**
 * Answers one chat completion request itself: true once it answered (or took `res` over), false to
 * let the stub answer as configured. `body` is the request body, already parsed.
 */
export type StubScript = (req: IncomingMessage, body: Record<string, unknown>, res: ServerResponse) => boolean;

export interface StubUpstream {
  /** Base URL including /v1, e.g. http://127.0.0.1:43123/v1 */
  readonly url: string;
  readonly port: number;
  /** Chat completion requests received (every POST to a chat completions path, including failed ones). */
  hits: number;
  /** SSE answers whose last byte (`[DONE]`) was handed to the OS: one held back by a slow reader is not counted yet. */
  readonly streamsFinished: number;
  /** The last {@link MAX_RECORDED_REQUESTS} chat completion requests, oldest first. */
  readonly requests: StubRequestRecord[];
  /**
   * Tests only (set in-process, never over HTTP): a reply no fault switch describes. Asked first for
   * every chat completion request with a JSON object body, after it was counted and recorded.
   * `reset()` clears it.
   */
  script: StubScript | undefined;
  /** Replace the whole fault config (also restarts the failTimes counters). */
  configure(config: StubConfig): void;
  /** Clear config, script, hits, streamsFinished, failTimes counters and recorded requests. */
  reset(): void;
  /** Close the server and destroy every open socket, including ones with a request in flight. */
  close(): Promise<void>;
}

export interface StubUpstreamOptions {
  /** 0 (default) picks a free port. */
  port?: number;
  /** Default 127.0.0.1: the stub must never be reachable from outside the machine by accident. */
  host?: string;
  config?: StubConfig;
  /** Default true; the benchmark turns it off so recording costs nothing. */
  recordRequests?: boolean;
  /**
   * Default false (tests name arbitrary models). True: any id GET /models does not list (the
   * {@link STUB_PRICES} entries but `default`) is refused as OpenRouter refuses an id it does not
   * know, exactly as the `invalidModelId` fault does, its `models` list as a whole. The gateway's
   * built-in mock turns it on, so a typo fails there as it will against OpenRouter.
   */
  knownModelsOnly?: boolean;
}

export interface StubPrice {
  /** USD per prompt token. */
  prompt: number;
  /** USD per completion token. */
  completion: number;
}

// ---------------------------------------------------------------------------------------
// Prices
// ---------------------------------------------------------------------------------------

/** Price used for models missing from {@link STUB_PRICES}. */
export const STUB_DEFAULT_PRICE: StubPrice = Object.freeze({ prompt: 1e-6, completion: 2e-6 });

/**
 * Built-in per-token USD prices. The `default` entry (same object as
 * {@link STUB_DEFAULT_PRICE}) prices any model not listed; it is not advertised by GET /v1/models.
 */
export const STUB_PRICES: Record<string, StubPrice> = Object.freeze({
  'openai/gpt-4o-mini': Object.freeze({ prompt: 0.15e-6, completion: 0.6e-6 }),
  'openai/gpt-4o': Object.freeze({ prompt: 2.5e-6, completion: 10e-6 }),
  'anthropic/claude-3.5-sonnet': Object.freeze({ prompt: 3e-6, completion: 15e-6 }),
  'anthropic/claude-3-haiku': Object.freeze({ prompt: 0.25e-6, completion: 1.25e-6 }),
  'meta-llama/llama-3.1-8b-instruct': Object.freeze({ prompt: 0.02e-6, completion: 0.05e-6 }),
  'mistralai/mistral-7b-instruct': Object.freeze({ prompt: 0.03e-6, completion: 0.055e-6 }),
  default: STUB_DEFAULT_PRICE,
});

const DEFAULT_PRICE_KEY = 'default';

/** The ids GET /models advertises: under `knownModelsOnly`, the only ones a request may name. */
const CATALOG: ReadonlySet<string> = new Set(Object.keys(STUB_PRICES).filter((id) => id !== DEFAULT_PRICE_KEY));

/** Context length advertised by GET /v1/models (the stub does not enforce it). */
const CONTEXT_LENGTHS: Readonly<Record<string, number>> = {
  'anthropic/claude-3.5-sonnet': 200_000,
  'anthropic/claude-3-haiku': 200_000,
  'mistralai/mistral-7b-instruct': 32_768,
};
const DEFAULT_CONTEXT_LENGTH = 128_000;

/**
 * Lookup index built once: the full id, plus the bare name after the provider slash when
 * it is unambiguous, so a gateway that strips the `openai/` prefix still gets real prices.
 */
const PRICE_INDEX: ReadonlyMap<string, StubPrice> = (() => {
  const index = new Map<string, StubPrice>();
  const bareSeen = new Map<string, number>();
  for (const id of Object.keys(STUB_PRICES)) {
    if (id === DEFAULT_PRICE_KEY) continue;
    const bare = id.slice(id.lastIndexOf('/') + 1);
    bareSeen.set(bare, (bareSeen.get(bare) ?? 0) + 1);
  }
  for (const [id, price] of Object.entries(STUB_PRICES)) {
    if (id === DEFAULT_PRICE_KEY) continue;
    index.set(id, price);
    const bare = id.slice(id.lastIndexOf('/') + 1);
    if (bareSeen.get(bare) === 1 && !(bare in STUB_PRICES)) index.set(bare, price);
  }
  return index;
})();

/** The price the stub charges for `model` (falls back to {@link STUB_DEFAULT_PRICE}). */
export function stubPrice(model: string): StubPrice {
  return PRICE_INDEX.get(model) ?? STUB_DEFAULT_PRICE;
}

/** A listed id, or one with a variant suffix OpenRouter accepts on any model (`:nitro`, `:floor`, `:free`…). */
function inCatalog(model: string): boolean {
  const colon = model.indexOf(':');
  return CATALOG.has(colon === -1 ? model : model.slice(0, colon));
}

/** Picodollars per USD: every stub price is a whole number of them. */
const PICOS = 1e12;

/** The `usage.cost` the stub reports for the given token counts. */
export function stubCost(model: string, promptTokens: number, completionTokens: number): number {
  const price = stubPrice(model);
  // Whole picodollars summed, then one division: the clean decimal OpenRouter sends (0.00006 for
  // 24 tokens at 2.5e-6), not a float product's drift (0.00006000000000000001).
  return (promptTokens * Math.round(price.prompt * PICOS) + completionTokens * Math.round(price.completion * PICOS)) / PICOS;
}

/** Per-token price as OpenRouter prints it: a plain decimal string, never exponent notation. */
function decimalString(n: number): string {
  const fixed = n.toFixed(12);
  // Strip trailing zeros (and a dangling dot) so 1.5e-7 reads "0.00000015".
  return fixed.includes('.') ? fixed.replace(/\.?0+$/, '') : fixed;
}

// ---------------------------------------------------------------------------------------
// Config validation (for the HTTP control surface, the CLI, and untyped JS callers)
// ---------------------------------------------------------------------------------------

const NUMERIC_FAULTS = [
  'latencyMs',
  'chunkDelayMs',
  'retryAfterSeconds',
  'failTimes',
  'cutAfterChunks',
  'hangMs',
  'completionTokens',
  'wordBytes',
  'errorAfterChunks',
  'malformedAfterChunks',
  'processingMs',
] as const;
const BOOLEAN_FAULTS = ['malformedJson', 'emptyAnswer', 'omitCost', 'errorInBody', 'errorInChoice', 'flagged', 'errorNull', 'invalidModelId'] as const;
const STRING_FAULTS = ['answerModel'] as const;
const KNOWN_FAULT_KEYS: ReadonlySet<string> = new Set<string>([...NUMERIC_FAULTS, ...BOOLEAN_FAULTS, ...STRING_FAULTS, 'status']);

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Copies only the keys that are set, so a per-model override never erases a global with `undefined`. */
function parseFaults(value: unknown, where: string, allowModels: boolean): StubFaults {
  if (!isRecord(value)) throw new TypeError(`${where} must be an object`);
  const out: StubFaults = {};
  for (const key of Object.keys(value)) {
    // Unknown keys are rejected rather than ignored: a typo in a benchmark config would
    // otherwise silently measure the happy path.
    if (!KNOWN_FAULT_KEYS.has(key) && !(allowModels && key === 'models')) {
      throw new TypeError(`${where}: unknown fault "${key}"`);
    }
  }
  for (const key of NUMERIC_FAULTS) {
    const v = value[key];
    if (v === undefined || v === null) continue;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new TypeError(`${where}.${key} must be a finite number >= 0`);
    }
    out[key] = v;
  }
  for (const key of BOOLEAN_FAULTS) {
    const v = value[key];
    if (v === undefined || v === null) continue;
    if (typeof v !== 'boolean') throw new TypeError(`${where}.${key} must be a boolean`);
    out[key] = v;
  }
  for (const key of STRING_FAULTS) {
    const v = value[key];
    if (v === undefined || v === null) continue;
    if (typeof v !== 'string' || v === '') throw new TypeError(`${where}.${key} must be a non-empty string`);
    out[key] = v;
  }
  const status = value['status'];
  if (status !== undefined && status !== null) {
    if (typeof status !== 'number' || !Number.isInteger(status) || status < 400 || status > 599) {
      throw new TypeError(`${where}.status must be an integer HTTP error status (400-599)`);
    }
    out.status = status;
  }
  return out;
}

/** Validates an untrusted value (e.g. a JSON body) as a {@link StubConfig}; throws TypeError. */
export function parseStubConfig(value: unknown): StubConfig {
  const config: StubConfig = parseFaults(value, 'config', true);
  const models = isRecord(value) ? value['models'] : undefined;
  if (models !== undefined && models !== null) {
    if (!isRecord(models)) throw new TypeError('config.models must be an object keyed by model id');
    const parsed: Record<string, StubFaults> = {};
    for (const [model, faults] of Object.entries(models)) {
      parsed[model] = parseFaults(faults, `config.models[${JSON.stringify(model)}]`, false);
    }
    config.models = parsed;
  }
  return config;
}

/**
 * The config flattened once at configure() time, so the hot path does a single Map lookup
 * per candidate model and never merges objects per request.
 */
interface CompiledConfig {
  readonly global: Readonly<StubFaults>;
  readonly perModel: ReadonlyMap<string, Readonly<StubFaults>>;
  /** Some model is set `invalidModelId`: only then are a request's candidates checked for one. */
  readonly invalidIds: boolean;
}

const NO_FAULTS: Readonly<StubFaults> = Object.freeze({});
const EMPTY_CONFIG: CompiledConfig = Object.freeze({ global: NO_FAULTS, perModel: new Map(), invalidIds: false });

function compileConfig(config: StubConfig): CompiledConfig {
  const parsed = parseStubConfig(config);
  const { models, ...globalFaults } = parsed;
  const global = Object.freeze(globalFaults);
  const perModel = new Map<string, Readonly<StubFaults>>();
  if (models) {
    for (const [model, faults] of Object.entries(models)) perModel.set(model, Object.freeze({ ...global, ...faults }));
  }
  const invalidIds = global.invalidModelId === true || [...perModel.values()].some((faults) => faults.invalidModelId === true);
  return { global, perModel, invalidIds };
}

// ---------------------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------------------

class BadRequest extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

interface ChatRequest {
  /** Models to try in order (one unless OpenRouter's `models` fallback list was given). */
  candidates: string[];
  stream: boolean;
  includeUsage: boolean;
  /** Upper bound on completion tokens, from max_tokens / max_completion_tokens. */
  maxTokens: number | undefined;
  promptTokens: number;
  /** Text of the last user message (string content, or text parts joined by spaces). */
  lastUserText: string;
}

function contentText(content: unknown): string {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return '';
  let text = '';
  for (const part of content) {
    if (isRecord(part) && typeof part['text'] === 'string') text = text === '' ? part['text'] : `${text} ${part['text']}`;
  }
  return text;
}

function readTokenLimit(body: Record<string, unknown>, key: string): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    throw new BadRequest(`${key} must be a positive integer`, 'invalid_value');
  }
  return v;
}

function parseChatRequest(body: unknown): ChatRequest {
  if (!isRecord(body)) throw new BadRequest('Request body must be a JSON object', 'invalid_request');

  const candidates: string[] = [];
  const model = body['model'];
  const models = body['models'];
  if (typeof model === 'string' && model !== '') candidates.push(model);
  if (Array.isArray(models)) {
    // OpenRouter: `model` (if given) is the first choice and `models` the fallback order.
    for (const m of models) if (typeof m === 'string' && m !== '' && !candidates.includes(m)) candidates.push(m);
  }
  if (candidates.length === 0) throw new BadRequest('you must provide a model parameter', 'missing_model');

  const messages = body['messages'];
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new BadRequest('messages must be a non-empty array', 'missing_messages');
  }
  let chars = 0;
  let lastUserText = '';
  for (const message of messages) {
    if (!isRecord(message)) throw new BadRequest('each message must be an object', 'invalid_message');
    const text = contentText(message['content']);
    chars += text.length;
    if (message['role'] === 'user') lastUserText = text;
  }

  const streamOptions = body['stream_options'];
  const a = readTokenLimit(body, 'max_tokens');
  const b = readTokenLimit(body, 'max_completion_tokens');
  return {
    candidates,
    stream: body['stream'] === true,
    includeUsage: isRecord(streamOptions) && streamOptions['include_usage'] === true,
    maxTokens: a === undefined ? b : b === undefined ? a : Math.min(a, b),
    promptTokens: Math.max(1, Math.ceil(chars / 4)),
    lastUserText,
  };
}

// ---------------------------------------------------------------------------------------
// Reply text: "words" are the unit for both tokens and SSE chunks
// ---------------------------------------------------------------------------------------

/** Same set as the JS `\s` class, so counting and splitting always agree. */
function isSpace(c: number): boolean {
  return (
    c === 0x20 ||
    (c >= 0x09 && c <= 0x0d) ||
    c === 0xa0 ||
    c === 0x1680 ||
    (c >= 0x2000 && c <= 0x200a) ||
    c === 0x2028 ||
    c === 0x2029 ||
    c === 0x202f ||
    c === 0x205f ||
    c === 0x3000 ||
    c === 0xfeff
  );
}

/** Count of words without allocating (the non-stream hot path only needs the number). */
function countWords(text: string): number {
  let words = 0;
  let inWord = false;
  for (let i = 0; i < text.length; i++) {
    const space = isSpace(text.charCodeAt(i));
    if (!space && !inWord) words++;
    inWord = !space;
  }
  return words;
}

/**
 * Splits into word pieces that keep their trailing whitespace, so joining the pieces gives
 * back the text exactly (the reply always starts with a non-space, so nothing leads).
 */
function splitWords(text: string): string[] {
  const pieces: string[] = [];
  let start = 0;
  let sawSpace = false;
  for (let i = 0; i < text.length; i++) {
    const space = isSpace(text.charCodeAt(i));
    if (!space && sawSpace) {
      pieces.push(text.slice(start, i));
      start = i;
    }
    sawSpace = space;
  }
  if (start < text.length) pieces.push(text.slice(start));
  return pieces;
}

const FILLER = ['lorem ', 'ipsum ', 'dolor ', 'sit ', 'amet '];

/** Pads (cycling filler words) or cuts `pieces` to exactly `n` words. */
function fitWords(pieces: string[], n: number): string[] {
  if (n === pieces.length) return pieces;
  let out: string[];
  if (n < pieces.length) {
    out = pieces.slice(0, n);
  } else {
    out = pieces.slice();
    const last = out.length - 1;
    if (last >= 0 && !isSpace(out[last].charCodeAt(out[last].length - 1))) out[last] += ' ';
    for (let i = 0; out.length < n; i++) out.push(FILLER[i % FILLER.length]);
  }
  // A cut or padded reply should not end in dangling whitespace.
  const last = out.length - 1;
  if (last >= 0) out[last] = out[last].trimEnd();
  return out;
}

/** Pads the word of each piece (not its trailing whitespace) with filler letters to `n` characters; never adds a word. */
function padWords(pieces: string[], n: number): string[] {
  return pieces.map((piece) => {
    let end = piece.length;
    while (end > 0 && isSpace(piece.charCodeAt(end - 1))) end--;
    return end >= n ? piece : `${piece.slice(0, end)}${'x'.repeat(n - end)}${piece.slice(end)}`;
  });
}

interface Completion {
  content: string;
  /** Word pieces for SSE; only computed when streaming. */
  pieces: string[] | undefined;
  finishReason: 'stop' | 'length';
  promptTokens: number;
  completionTokens: number;
}

function buildCompletion(chat: ChatRequest, faults: Readonly<StubFaults>): Completion {
  const reply = `Mock reply to: ${chat.lastUserText.slice(0, 60)}`;
  const forced = faults.completionTokens;
  const limit = chat.maxTokens;
  // Fast path (the benchmark's common case): nothing to pad, cut or stream — count only.
  if (!chat.stream && forced === undefined && faults.wordBytes === undefined) {
    const words = countWords(reply);
    if (limit === undefined || words <= limit) {
      return { content: reply, pieces: undefined, finishReason: 'stop', promptTokens: chat.promptTokens, completionTokens: words };
    }
  }
  let pieces = splitWords(reply);
  if (forced !== undefined) pieces = fitWords(pieces, Math.floor(forced));
  let finishReason: 'stop' | 'length' = 'stop';
  if (limit !== undefined && pieces.length > limit) {
    pieces = fitWords(pieces, limit);
    finishReason = 'length';
  }
  if (faults.wordBytes !== undefined) pieces = padWords(pieces, Math.floor(faults.wordBytes));
  return {
    content: pieces.join(''),
    pieces,
    finishReason,
    promptTokens: chat.promptTokens,
    completionTokens: pieces.length,
  };
}

interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  cost?: number;
}

function buildUsage(model: string, completion: Completion, omitCost: boolean | undefined): Usage {
  const usage: Usage = {
    prompt_tokens: completion.promptTokens,
    completion_tokens: completion.completionTokens,
    total_tokens: completion.promptTokens + completion.completionTokens,
  };
  if (!omitCost) usage.cost = stubCost(model, completion.promptTokens, completion.completionTokens);
  return usage;
}

// ---------------------------------------------------------------------------------------
// Response helpers
// ---------------------------------------------------------------------------------------

const JSON_TYPE = 'application/json';
const SSE_HEADERS = Object.freeze({
  'content-type': 'text/event-stream',
  'cache-control': 'no-cache',
});
const SSE_DONE = 'data: [DONE]\n\n';
const SSE_PROCESSING = ': OPENROUTER PROCESSING\n\n';
/** Between two keep-alives while `processingMs` lasts. */
const PROCESSING_EVERY_MS = 50;
const MALFORMED_JSON_BODY = '{"id":"chatcmpl-stub","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Mock';
const EMPTY_ANSWER_JSON_BODY = '{"id":"chatcmpl-stub","object":"chat.completion","created":0,"choices":[{"index":0,"finish_reason":"stop"}]}';
const MALFORMED_SSE_BODY = 'data: {"id":"chatcmpl-stub","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Mo\n\n' + SSE_DONE;
const OK_BODY = '{"ok":true}';
const MAX_BODY_BYTES = 10 * 1024 * 1024;
/** Cap on {@link StubUpstream.requests}, so a long test run cannot grow memory without bound. */
const MAX_RECORDED_REQUESTS = 200;

const CHAT_PATHS: ReadonlySet<string> = new Set(['/v1/chat/completions', '/chat/completions', '/api/v1/chat/completions']);
const MODELS_PATHS: ReadonlySet<string> = new Set(['/v1/models', '/models', '/api/v1/models']);

/** Built once: the model list never changes at run time. */
const MODELS_BODY = JSON.stringify({
  data: [...CATALOG].map((id) => ({
    id,
    name: `Stub ${id}`,
    pricing: { prompt: decimalString(STUB_PRICES[id].prompt), completion: decimalString(STUB_PRICES[id].completion) },
    context_length: CONTEXT_LENGTHS[id] ?? DEFAULT_CONTEXT_LENGTH,
  })),
});

function sendBody(res: ServerResponse, status: number, body: string, contentType: string): void {
  // Headers already out: keep-alives (processingMs) went first.
  if (res.headersSent) {
    res.end(body);
    return;
  }
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function sseHead(res: ServerResponse): void {
  if (!res.headersSent) res.writeHead(200, SSE_HEADERS);
}

/**
 * OpenRouter's error object: `code` is the HTTP status as a number. A moderation refusal (403)
 * describes the flagged input in `metadata`, as OpenRouter documents it.
 */
function openRouterError(status: number, message: string, model: string, flagged: boolean): Record<string, unknown> {
  if (!flagged) return { code: status, message };
  return {
    code: status,
    message: `${model} requires moderation on OpenRouter. Your input was flagged for "harassment". No credits were charged.`,
    metadata: { reasons: ['harassment'], flagged_input: 'the flagged part of the input', provider_name: 'Stub', model_slug: model },
  };
}

/** OpenAI-style `type` / `code` per status, so gateways can exercise their error mapping. */
function errorKind(status: number): [type: string, code: string] {
  switch (status) {
    case 400:
      return ['invalid_request_error', 'invalid_request'];
    case 401:
      return ['authentication_error', 'invalid_api_key'];
    case 402:
      return ['insufficient_quota', 'insufficient_credits'];
    case 403:
      return ['permission_error', 'forbidden'];
    case 404:
      return ['not_found_error', 'not_found'];
    case 408:
      return ['timeout_error', 'timeout'];
    case 413:
      return ['invalid_request_error', 'request_too_large'];
    case 429:
      return ['rate_limit_error', 'rate_limit_exceeded'];
    case 502:
      return ['server_error', 'bad_gateway'];
    case 503:
      return ['server_error', 'service_unavailable'];
    case 504:
      return ['server_error', 'gateway_timeout'];
    default:
      return status >= 500 ? ['server_error', 'server_error'] : ['invalid_request_error', 'error'];
  }
}

function sendError(res: ServerResponse, status: number, message: string, code?: string, retryAfterSeconds?: number): void {
  const [type, defaultCode] = errorKind(status);
  const body = JSON.stringify({ error: { message, type, code: code ?? defaultCode } });
  if (retryAfterSeconds === undefined) {
    sendBody(res, status, body, JSON_TYPE);
    return;
  }
  res.writeHead(status, {
    'content-type': JSON_TYPE,
    'content-length': Buffer.byteLength(body),
    'retry-after': String(Math.ceil(retryAfterSeconds)),
  });
  res.end(body);
}

function pathOf(url: string | undefined): string {
  if (url === undefined) return '/';
  const q = url.indexOf('?');
  return q === -1 ? url : url.slice(0, q);
}

/** Reads the whole body as UTF-8; `done(null)` when it is too large or the client went away. */
function readBody(req: IncomingMessage, done: (text: string | null) => void): void {
  let first: Buffer | undefined;
  let rest: Buffer[] | undefined;
  let size = 0;
  let failed = false;
  req.on('data', (chunk: Buffer) => {
    if (failed) return;
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      failed = true;
      done(null);
      return;
    }
    // Single-chunk bodies (the common case) skip Buffer.concat entirely.
    if (first === undefined) first = chunk;
    else (rest ??= [first]).push(chunk);
  });
  req.on('end', () => {
    if (failed) return;
    if (rest !== undefined) done(Buffer.concat(rest, size).toString('utf8'));
    else done(first === undefined ? '' : first.toString('utf8'));
  });
  // An aborted upload emits 'error'; without a listener it would crash the host process.
  req.on('error', () => {
    failed = true;
  });
}

/** Formats a listening address as a URL host (brackets IPv6; maps wildcards to loopback). */
function urlHost(address: string): string {
  if (address === '0.0.0.0') return '127.0.0.1';
  if (address === '::') return '[::1]';
  return address.includes(':') ? `[${address}]` : address;
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/** Everything needed to answer once the pre-header delay (hang + latency) is over. */
interface Answer {
  res: ServerResponse;
  chat: ChatRequest;
  model: string;
  faults: Readonly<StubFaults>;
  /** The HTTP error to send, or 0 for a successful answer. */
  errorStatus: number;
}

class StubUpstreamServer implements StubUpstream {
  hits = 0;
  streamsFinished = 0;
  readonly requests: StubRequestRecord[] = [];
  script: StubScript | undefined;
  private config: CompiledConfig = EMPTY_CONFIG;
  /** failTimes counters, keyed by model id. */
  private readonly failures = new Map<string, number>();
  /** Pending fault timers, cleared on close() so a long hangMs cannot keep the process alive. */
  private readonly timers = new Set<NodeJS.Timeout>();
  /** Unique per instance so ids from two stubs (or two runs) never collide. */
  private readonly idPrefix = randomBytes(4).toString('hex');
  private seq = 0;
  private listenUrl = '';
  private listenPort = 0;
  private closing: Promise<void> | undefined;
  private readonly server: Server;
  /** `res.end` callback of an SSE answer: one function for all, not a closure per stream. Node calls it with an error if the socket died first. */
  private readonly streamFlushed = (error?: Error | null): void => {
    if (!error) this.streamsFinished++;
  };

  constructor(
    private readonly record: boolean,
    private readonly knownModelsOnly: boolean,
  ) {
    this.server = createServer(
      {
        // Above the usual 60s client idle timeouts so benchmark keep-alive sockets are reused
        // rather than raced by a server-side close.
        keepAliveTimeout: 65_000,
        // Nagle would add latency to every small SSE frame.
        noDelay: true,
      },
      (req, res) => this.handle(req, res),
    );
    this.server.headersTimeout = 66_000;
  }

  get url(): string {
    return this.listenUrl;
  }

  get port(): number {
    return this.listenPort;
  }

  async listen(port: number, host: string): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const address = this.server.address() as AddressInfo;
    this.listenPort = address.port;
    this.listenUrl = `http://${urlHost(address.address)}:${address.port}/v1`;
  }

  configure(config: StubConfig): void {
    this.config = compileConfig(config);
    // A new scenario starts with fresh failTimes budgets.
    this.failures.clear();
  }

  reset(): void {
    this.config = EMPTY_CONFIG;
    this.script = undefined;
    this.failures.clear();
    this.hits = 0;
    this.streamsFinished = 0;
    this.requests.length = 0;
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve, reject) => {
      for (const timer of this.timers) clearTimeout(timer);
      this.timers.clear();
      this.server.close((err) => (err ? reject(err) : resolve()));
      // server.close() alone waits for in-flight requests (e.g. a hangMs one) to finish.
      this.server.closeAllConnections();
    });
    return this.closing;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const path = pathOf(req.url);
    const method = req.method ?? 'GET';
    if (method === 'POST' && CHAT_PATHS.has(path)) {
      this.hits++;
      readBody(req, (text) => this.onChatBody(req, res, path, text));
      return;
    }
    if (method === 'GET' && MODELS_PATHS.has(path)) {
      sendBody(res, 200, MODELS_BODY, JSON_TYPE);
      return;
    }
    if (path.startsWith('/__stub/')) {
      this.handleControl(req, res, method, path);
      return;
    }
    sendError(res, 404, `Unknown route: ${method} ${path}`, 'unknown_route');
  }

  private handleControl(req: IncomingMessage, res: ServerResponse, method: string, path: string): void {
    if (method === 'GET' && path === '/__stub/stats') {
      sendBody(res, 200, JSON.stringify({ hits: this.hits, streamsFinished: this.streamsFinished }), JSON_TYPE);
    } else if (method === 'POST' && path === '/__stub/reset') {
      this.reset();
      sendBody(res, 200, OK_BODY, JSON_TYPE);
    } else if (method === 'POST' && path === '/__stub/config') {
      readBody(req, (text) => {
        if (text === null) {
          if (!res.destroyed) sendError(res, 413, 'Request body too large');
          return;
        }
        try {
          this.configure(parseStubConfig(JSON.parse(text)));
        } catch (err) {
          sendError(res, 400, `Invalid stub config: ${err instanceof Error ? err.message : String(err)}`, 'invalid_config');
          return;
        }
        sendBody(res, 200, OK_BODY, JSON_TYPE);
      });
    } else {
      sendError(res, 404, `Unknown route: ${method} ${path}`, 'unknown_route');
    }
  }

  private onChatBody(req: IncomingMessage, res: ServerResponse, path: string, text: string | null): void {
    if (text === null) {
      if (!res.destroyed) sendError(res, 413, 'Request body too large');
      return;
    }
    let body: unknown;
    let validJson = true;
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
      validJson = false;
    }
    if (this.record) this.recordRequest(req, path, body);
    if (!validJson) {
      sendError(res, 400, 'Request body is not valid JSON', 'invalid_json');
      return;
    }
    if (this.script !== undefined && isRecord(body) && this.script(req, body, res)) return;

    let chat: ChatRequest;
    try {
      chat = parseChatRequest(body);
    } catch (err) {
      // Never rethrow from here: this runs in an event callback, and in the gateway's
      // in-process mock mode an uncaught error would take the gateway down with it.
      if (err instanceof BadRequest) sendError(res, 400, err.message, err.code);
      else sendError(res, 500, `Stub upstream bug: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }

    const { candidates } = chat;
    // OpenRouter checks every id before routing: one it does not know refuses the whole request.
    const invalid = this.knownModelsOnly || this.config.invalidIds ? this.unknownModel(candidates) : undefined;
    if (invalid !== undefined) {
      sendBody(res, 400, JSON.stringify({ error: openRouterError(400, `${invalid} is not a valid model ID`, invalid, false) }), JSON_TYPE);
      return;
    }

    // Walk the candidates like OpenRouter's fallback routing: the first model without an
    // active status fault answers; if every one fails, the last one's error is returned.
    let model = candidates[0];
    let faults = this.faultsFor(model);
    let errorStatus = this.activeStatus(model, faults);
    for (let i = 1; errorStatus !== 0 && i < candidates.length; i++) {
      model = candidates[i];
      faults = this.faultsFor(model);
      errorStatus = this.activeStatus(model, faults);
    }

    const answer: Answer = { res, chat, model, faults, errorStatus };
    // Keep-alives only before a 200: an HTTP error status must be in the headers.
    const respond = faults.processingMs && (errorStatus === 0 || faults.errorInBody) ? () => this.processing(answer) : () => this.answer(answer);
    const delay = (faults.hangMs ?? 0) + (faults.latencyMs ?? 0);
    if (delay > 0) this.later(res, delay, respond);
    else respond();
  }

  /** The 200 headers now, then only keep-alives for `processingMs`, then the answer on the open response. */
  private processing(a: Answer): void {
    const { res } = a;
    if (res.destroyed) return;
    res.writeHead(200, a.chat.stream ? SSE_HEADERS : { 'content-type': JSON_TYPE });
    const keepAlive = a.chat.stream ? SSE_PROCESSING : ' ';
    const endsAt = Date.now() + (a.faults.processingMs ?? 0);
    const tick = (): void => {
      if (res.destroyed) return;
      const left = endsAt - Date.now();
      if (left <= 0) {
        this.answer(a);
        return;
      }
      res.write(keepAlive);
      this.later(res, Math.min(PROCESSING_EVERY_MS, left), tick);
    };
    tick();
  }

  private faultsFor(model: string): Readonly<StubFaults> {
    return this.config.perModel.get(model) ?? this.config.global;
  }

  /** The first candidate OpenRouter would not know: outside the catalog (knownModelsOnly) or set `invalidModelId`. */
  private unknownModel(candidates: readonly string[]): string | undefined {
    for (const model of candidates) {
      if ((this.knownModelsOnly && !inCatalog(model)) || (this.config.invalidIds && this.faultsFor(model).invalidModelId === true)) return model;
    }
    return undefined;
  }

  /** The error status this request must get from `model`, or 0; consumes a failTimes slot. */
  private activeStatus(model: string, faults: Readonly<StubFaults>): number {
    const { failTimes } = faults;
    // errorInBody alone still means an error (502, as documented), not a normal completion.
    const status = faults.status ?? (faults.errorInBody === true ? 502 : undefined);
    if (status === undefined) return 0;
    if (failTimes === undefined) return status;
    const used = this.failures.get(model) ?? 0;
    if (used >= failTimes) return 0;
    this.failures.set(model, used + 1);
    return status;
  }

  private recordRequest(req: IncomingMessage, path: string, body: unknown): void {
    if (this.requests.length >= MAX_RECORDED_REQUESTS) this.requests.shift();
    this.requests.push({ method: req.method ?? 'POST', path, headers: req.headers, body, at: Date.now() });
  }

  /** setTimeout that is cancelled when the client leaves or the stub closes. */
  private later(res: ServerResponse, ms: number, fn: () => void): void {
    if (this.closing) return;
    const cancel = (): void => {
      clearTimeout(timer);
      this.timers.delete(timer);
    };
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      res.off('close', cancel);
      fn();
    }, ms);
    this.timers.add(timer);
    res.once('close', cancel);
  }

  private answer(a: Answer): void {
    const { res, faults, model } = a;
    if (res.destroyed) return;
    if (a.errorStatus !== 0) {
      const message = `Stub upstream fault: ${model} answered ${a.errorStatus}`;
      if (faults.errorInBody) {
        // OpenRouter's shape: a numeric code, the status the error would have had.
        const error = openRouterError(a.errorStatus, message, model, faults.flagged === true);
        if (a.chat.stream) {
          sseHead(res);
          const event = { id: 'chatcmpl-stub', object: 'chat.completion.chunk', created: 0, model, error, choices: [{ index: 0, delta: { content: '' }, finish_reason: 'error' }] };
          res.end(`data: ${JSON.stringify(event)}\n\n${SSE_DONE}`, this.streamFlushed);
        } else {
          sendBody(res, 200, JSON.stringify({ error }), JSON_TYPE);
        }
      } else if (faults.flagged) {
        sendBody(res, a.errorStatus, JSON.stringify({ error: openRouterError(a.errorStatus, message, model, true) }), JSON_TYPE);
      } else {
        sendError(res, a.errorStatus, message, undefined, faults.retryAfterSeconds);
      }
      return;
    }
    if (faults.malformedJson) {
      if (a.chat.stream) {
        sseHead(res);
        res.end(MALFORMED_SSE_BODY, this.streamFlushed);
      } else {
        sendBody(res, 200, MALFORMED_JSON_BODY, JSON_TYPE);
      }
      return;
    }
    if (faults.emptyAnswer) {
      if (a.chat.stream) {
        sseHead(res);
        res.end(SSE_DONE, this.streamFlushed);
      } else {
        sendBody(res, 200, EMPTY_ANSWER_JSON_BODY, JSON_TYPE);
      }
      return;
    }

    const completion = buildCompletion(a.chat, faults);
    const id = `chatcmpl-${this.idPrefix}${(++this.seq).toString(36)}`;
    const created = Math.floor(Date.now() / 1000);
    const named = faults.answerModel ?? model;
    if (a.chat.stream) {
      this.stream(res, id, created, model, completion, a.chat.includeUsage, faults);
      return;
    }
    if (faults.errorAfterChunks !== undefined) {
      // A mid-generation error in a JSON answer: what was produced, finish_reason "error", and the error.
      const pieces = splitWords(completion.content).slice(0, Math.floor(faults.errorAfterChunks));
      const partial: Completion = { ...completion, content: pieces.join(''), completionTokens: pieces.length };
      const error = openRouterError(502, `Stub upstream fault: ${model} failed mid-generation`, model, false);
      const choice = { index: 0, message: { role: 'assistant', content: partial.content }, finish_reason: 'error' };
      const body = JSON.stringify({
        id,
        object: 'chat.completion',
        created,
        model: named,
        choices: [faults.errorInChoice === true ? { ...choice, error } : choice],
        ...(faults.errorInChoice === true ? {} : { error }),
        usage: buildUsage(model, partial, faults.omitCost),
      });
      sendBody(res, 200, body, JSON_TYPE);
      return;
    }
    const body = JSON.stringify({
      id,
      object: 'chat.completion',
      created,
      model: named,
      choices: [{ index: 0, message: { role: 'assistant', content: completion.content }, finish_reason: completion.finishReason }],
      usage: buildUsage(model, completion, faults.omitCost),
      ...(faults.errorNull === true ? { error: null } : {}),
    });
    sendBody(res, 200, body, JSON_TYPE);
  }

  private stream(
    res: ServerResponse,
    id: string,
    created: number,
    model: string,
    completion: Completion,
    includeUsage: boolean,
    faults: Readonly<StubFaults>,
  ): void {
    // Every frame shares this prefix, so only the model id and each word go through JSON.stringify.
    const nullError = faults.errorNull === true && faults.errorAfterChunks === undefined ? '"error":null,' : '';
    const head = `data: {"id":"${id}","object":"chat.completion.chunk","created":${created},"model":${JSON.stringify(faults.answerModel ?? model)},${nullError}"choices":[`;
    const frames: string[] = [`${head}{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n`];
    for (const piece of completion.pieces ?? []) {
      frames.push(`${head}{"index":0,"delta":{"content":${JSON.stringify(piece)}},"finish_reason":null}]}\n\n`);
    }
    if (faults.errorAfterChunks !== undefined) {
      // OpenRouter's mid-stream error: an event with the error and a choice finished as "error", then [DONE].
      frames.length = Math.min(frames.length, Math.floor(faults.errorAfterChunks));
      const error = JSON.stringify(openRouterError(502, `Stub upstream fault: ${model} failed mid-generation`, model, false));
      frames.push(`${head}{"index":0,"delta":{"content":""},"finish_reason":"error"}],"error":${error}}\n\n`);
    } else {
      frames.push(`${head}{"index":0,"delta":{},"finish_reason":"${completion.finishReason}"}]}\n\n`);
      if (includeUsage) frames.push(`${head}],"usage":${JSON.stringify(buildUsage(model, completion, faults.omitCost))}}\n\n`);
    }
    if (faults.malformedAfterChunks !== undefined) {
      frames.splice(Math.min(Math.floor(faults.malformedAfterChunks), frames.length), 0, `${head}{"index":0,"delta":{"content":"x"},"finish_reason":null},]}\n\n`);
    }
    frames.push(SSE_DONE);

    sseHead(res);
    const cut = faults.cutAfterChunks === undefined ? undefined : Math.min(Math.floor(faults.cutAfterChunks), frames.length - 1);
    const delay = faults.chunkDelayMs ?? 0;
    if (delay <= 0 || cut === 0) {
      if (cut === undefined) res.end(frames.join(''), this.streamFlushed);
      else cutAfter(res, frames.slice(0, cut).join(''));
      return;
    }
    this.streamStep(res, frames, 0, cut, delay);
  }

  /** Writes frame `i`, then schedules the next one `delay` ms later (chunkDelayMs path only). */
  private streamStep(res: ServerResponse, frames: string[], i: number, cut: number | undefined, delay: number): void {
    if (res.destroyed) return;
    const frame = frames[i];
    if (cut !== undefined && i + 1 >= cut) {
      cutAfter(res, frame);
      return;
    }
    if (i === frames.length - 1) {
      res.end(frame, this.streamFlushed);
      return;
    }
    res.write(frame);
    this.later(res, delay, () => this.streamStep(res, frames, i + 1, cut, delay));
  }
}

/**
 * Sends `data` (possibly nothing beyond the headers) and then destroys the socket, so the
 * client sees a chunked body that ends without its terminator — like a dropped upstream.
 * The destroy waits for the write callback so the frames really reach the client first.
 */
function cutAfter(res: ServerResponse, data: string): void {
  if (data === '') res.flushHeaders();
  // Zero-length writes do not reliably call back, so a headers-only cut writes through the socket.
  const socket = res.socket;
  if (data === '' && socket) socket.write('', () => res.destroy());
  else res.write(data, () => res.destroy());
}

/** Starts a stub upstream on loopback (port 0 = any free port) and resolves once it is listening. */
export async function startStubUpstream(opts: StubUpstreamOptions = {}): Promise<StubUpstream> {
  const stub = new StubUpstreamServer(opts.recordRequests ?? true, opts.knownModelsOnly ?? false);
  if (opts.config) stub.configure(opts.config);
  await stub.listen(opts.port ?? 0, opts.host ?? '127.0.0.1');
  return stub;
}
