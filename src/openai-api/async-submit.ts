import type { FastifyReply, FastifyRequest } from 'fastify';
import { UNSTORABLE } from '../audit/audit-event.js';
import type { CompletionCall } from '../completion/completion.types.js';
import { GatewayError } from '../core/errors.js';
import { parseIdempotencyKey, submissionHash } from '../idempotency/idempotency-key.js';
import { type JobDoor, jobView } from '../jobs/job.types.js';
import type { JobsService } from '../jobs/jobs.service.js';

const MAX_CALLBACK_URL = 2048;

export function parseCallbackUrl(value: unknown): string | undefined {
  if (value === undefined || value === null) return undefined;
  const invalid = () => new GatewayError('invalid_value', "'callback_url' must be an absolute http(s) URL.", { param: 'callback_url' });
  if (typeof value !== 'string' || value.length > MAX_CALLBACK_URL) throw invalid();
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw invalid();
  }
  if ((url.protocol !== 'http:' && url.protocol !== 'https:') || url.username || url.password) throw invalid();
  return url.toString();
}

/**
 * A sync call answers in its response, so a `callback_url` on it would never be called: a client
 * that forgot `prefer: respond-async` is told, rather than left waiting for a POST that never comes.
 */
export function refuseCallbackWithoutAsync(raw: unknown): void {
  const url = (raw as Record<string, unknown>).callback_url;
  if (url === undefined || url === null) return;
  throw new GatewayError('invalid_value', "'callback_url' is only used with the header prefer: respond-async; a call without it is answered in its response.", {
    param: 'callback_url',
  });
}

// The audit writer's pattern, without its global flag: test() then keeps no state between calls.
const ONE_UNSTORABLE = new RegExp(UNSTORABLE.source);

/**
 * What in any string or key of a JSON value PostgreSQL jsonb refuses: a U+0000, else a lone
 * surrogate (half of a UTF-16 pair, which JSON.stringify writes as an escape such as `\ud83d`).
 */
export function unstorableIn(value: unknown): 'nul' | 'lone_surrogate' | undefined {
  let found: 'nul' | 'lone_surrogate' | undefined;
  const check = (text: string) => {
    if (found !== 'nul' && ONE_UNSTORABLE.test(text)) found = text.includes('\0') ? 'nul' : 'lone_surrogate';
  };
  JSON.stringify(value, (key: string, item: unknown) => {
    check(key);
    if (typeof item === 'string') check(item);
    return item;
  });
  return found;
}

/**
 * The async branch of a completion door: the request, validated exactly as a sync one, becomes
 * a job; the answer is 202 with where to poll. A repeat with the same idempotency-key gets the
 * same job (marked `idempotent-replayed`).
 */
export async function submitAsync(
  jobs: JobsService,
  request: FastifyRequest,
  reply: FastifyReply,
  call: CompletionCall,
  door: JobDoor,
  raw: unknown,
): Promise<void> {
  if (call.body.stream === true) {
    throw new GatewayError('invalid_value', "'stream: true' cannot be combined with 'prefer: respond-async': a job's result is one JSON completion.", {
      param: 'stream',
    });
  }
  // A job's body is stored as jsonb, which cannot hold U+0000 or a lone surrogate anywhere: said
  // as a 400 here, not a vague one (or a 500) from the insert. Not replaced by U+FFFD as an
  // outcome's are: the job would then ask something else than the sync call, which forwards the
  // request as sent.
  const unstorable = unstorableIn(call.body);
  if (unstorable === 'nul') {
    throw new GatewayError('invalid_value', 'A request with a U+0000 (NUL) character cannot be queued; send it without prefer: respond-async, or without the character.', {
      param: 'messages',
    });
  }
  if (unstorable === 'lone_surrogate') {
    throw new GatewayError(
      'invalid_value',
      'A request with a lone UTF-16 surrogate (half of a pair, such as \\ud83d without its low half: an emoji cut in two) cannot be queued; send it without prefer: respond-async, or with the pair whole.',
      { param: 'messages' },
    );
  }
  // A deferred rate-limit verdict must be in before the job exists.
  await call.admission;
  const { job, created } = await jobs.submit({
    principal: call.principal,
    door,
    body: call.body,
    taskType: call.taskType,
    cacheControl: call.cacheControl,
    requestId: call.requestId,
    idempotencyKey: parseIdempotencyKey(request.headers['idempotency-key']),
    bodyHash: submissionHash(door, call.taskType, raw),
    // `raw` is the body the door already validated (an object, its depth checked).
    callbackUrl: parseCallbackUrl((raw as Record<string, unknown>).callback_url),
  });
  void reply.status(202).header('location', `/v1/jobs/${job.id}`).header('preference-applied', 'respond-async');
  if (!created) void reply.header('idempotent-replayed', 'true');
  await reply.send(jobView(job));
}
