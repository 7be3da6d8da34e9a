import { toUsdJson, type UsdJson } from '../../libs/money/src/index.js';
import type { ChatCompletionRequest, ErrorBody } from '../../libs/openai-contract/src/index.js';
import type { CompletionCall } from '../completion/completion.types.js';
import type { Principal } from '../identity/principal.js';

export type JobStatus = 'queued' | 'running' | 'completed' | 'failed';
/** The HTTP door a job was submitted through. */
export type JobDoor = 'chat' | 'complete';

/** One row of `jobs`: the source of truth for an async request, whichever queue carries it. */
export interface JobRecord {
  id: string;
  userId: string;
  departmentId: string;
  keyId: string;
  status: JobStatus;
  door: JobDoor;
  requestBody: ChatCompletionRequest;
  taskType: string | null;
  cacheControl: CompletionCall['cacheControl'];
  /** The submitting HTTP request's id, to correlate logs. */
  requestId: string;
  /** The chat completion, once completed. */
  result: unknown;
  error: ErrorBody | null;
  model: string | null;
  costNanos: bigint | null;
  attempts: number;
  deadLettered: boolean;
  idempotencyKey: string | null;
  bodyHash: string;
  callbackUrl: string | null;
  createdAt: Date;
  /** When the queue confirmed it; null while its submit may still be refused (and the record removed). */
  enqueuedAt: Date | null;
  startedAt: Date | null;
  completedAt: Date | null;
}

export interface NewJob {
  principal: Principal;
  door: JobDoor;
  body: ChatCompletionRequest;
  taskType: string | undefined;
  cacheControl: CompletionCall['cacheControl'];
  requestId: string;
  idempotencyKey: string | undefined;
  bodyHash: string;
  callbackUrl: string | undefined;
}

/** What `GET /v1/jobs/{id}` and callbacks send (API.md "Async"). */
export interface JobView {
  id: string;
  object: 'gateway.job';
  status: JobStatus;
  result: unknown;
  error: ErrorBody | null;
  attempts: number;
  dead_lettered: boolean;
  created_at: string;
  started_at: string | null;
  completed_at: string | null;
  model: string | null;
  /** An exact plain decimal in JSON (never 1.5e-7). */
  cost_usd: UsdJson | null;
}

export function jobView(job: JobRecord): JobView {
  return {
    id: job.id,
    object: 'gateway.job',
    status: job.status,
    result: job.result ?? null,
    error: job.error,
    attempts: job.attempts,
    dead_lettered: job.deadLettered,
    created_at: job.createdAt.toISOString(),
    started_at: job.startedAt?.toISOString() ?? null,
    completed_at: job.completedAt?.toISOString() ?? null,
    model: job.model,
    cost_usd: job.costNanos === null ? null : toUsdJson(job.costNanos),
  };
}

/** Admins also see whose job it is and where it came from. */
export function adminJobView(job: JobRecord) {
  return { ...jobView(job), user_id: job.userId, department_id: job.departmentId, key_id: job.keyId, door: job.door, request_id: job.requestId };
}
