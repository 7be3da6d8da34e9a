import { Injectable } from '@nestjs/common';
import { DataSource } from 'typeorm';
import type { ErrorBody } from '../../libs/openai-contract/src/index.js';
import { SUSPECT, UNSTORABLE } from '../audit/audit-event.js';
import { IDEMPOTENCY_WINDOW_MS } from '../idempotency/idempotency.service.js';
import type { CacheScope, UserRole } from '../identity/identity.entities.js';
import type { JobRecord, JobStatus, NewJob } from './job.types.js';

type Row = Record<string, unknown>;

/** The current state of the key a job was submitted with; null when it no longer authenticates. */
export interface KeyState {
  prefix: string;
  role: UserRole;
  cacheScope: CacheScope;
  expiresAt: Date | null;
}

export interface StatusCounts {
  queued: number;
  running: number;
  completed: number;
  failed: number;
  dead_lettered: number;
}

// Transitions only ever move forward from the states named in each WHERE, so a repeated
// delivery or a late writer can never turn a finished job back into an unfinished one.
/**
 * A dead-lettered job's place in the dead-letter list: when it was first dead-lettered, or, for
 * one dead-lettered by an instance older than migration 1764400005200, when it failed. The same
 * expression as the index jobs_dead_list_idx (migration 1764400005400), which serves the list.
 */
const DEAD_PLACE = 'COALESCE(dead_lettered_at, completed_at)';

const UNFINISHED = `status IN ('queued', 'running')`;

/** Job records in SQL that runs unchanged on PostgreSQL and PGlite. */
@Injectable()
export class JobsRepository {
  constructor(private readonly db: DataSource) {}

  /**
   * Inserts a job, or returns the one this user already submitted with the same idempotency
   * key (`created: false`); the unique index settles concurrent submits of one key. A key lasts
   * as a sync call's does, 24 h from the submit (API.md), and as long as its job is unfinished
   * (a repeat must never start a second run of it): after that it is released from its job,
   * which stays readable by id, and the new job takes it.
   */
  async insert(job: NewJob, now: Date): Promise<{ job: JobRecord; created: boolean }> {
    const keyExpiredBefore = new Date(now.getTime() - IDEMPOTENCY_WINDOW_MS);
    for (let round = 0; round < 3; round += 1) {
      const inserted = await this.db.query<Row[]>(
        `INSERT INTO jobs (user_id, department_id, key_id, door, request_body, task_type, cache_control, request_id,
                           idempotency_key, body_hash, callback_url, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, $8, $9, $10, $11, $12, $12)
         ON CONFLICT (user_id, idempotency_key) DO NOTHING
         RETURNING *`,
        [
          job.principal.userId,
          job.principal.departmentId,
          job.principal.keyId,
          job.door,
          JSON.stringify(job.body),
          job.taskType ?? null,
          JSON.stringify(job.cacheControl),
          job.requestId,
          job.idempotencyKey ?? null,
          job.bodyHash,
          job.callbackUrl ?? null,
          now,
        ],
      );
      if (inserted[0]) return { job: toRecord(inserted[0]), created: true };
      const existing = await this.db.query<Row[]>(`SELECT * FROM jobs WHERE user_id = $1 AND idempotency_key = $2`, [job.principal.userId, job.idempotencyKey]);
      // Gone again: its submit was refused (queue full or away) and removed; insert afresh.
      if (!existing[0]) continue;
      const found = toRecord(existing[0]);
      if (!(found.createdAt <= keyExpiredBefore && (found.status === 'completed' || found.status === 'failed'))) return { job: found, created: false };
      // Expired: released, then inserted afresh in the next round. Of concurrent submits with the
      // key, one release changes the row (the others find the key gone from it) and one insert
      // wins the unique index; the rest are answered with the job that insert made.
      await this.releaseKey(found.id, job.idempotencyKey, keyExpiredBefore);
    }
    throw new Error('idempotent job insert kept racing with deletes');
  }

  /**
   * Whether a sync call of this user holds the key (sync calls and async submits share one key
   * space per user): its row in `idempotency_keys` was claimed within the window. A done row past
   * it has expired, as IdempotencyRepository.claim treats it, and does not block. A running row
   * whose process died counts until then too, although a sync repeat may take it over sooner (see
   * abandonedAfterMs): the key was a sync call's, and its client's retry belongs on that door.
   */
  async heldBySyncCall(userId: string, key: string, expiredBefore: Date): Promise<boolean> {
    const rows = await this.db.query<Row[]>(`SELECT 1 FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2 AND created_at > $3`, [
      userId,
      key,
      expiredBefore,
    ]);
    return rows.length > 0;
  }

  /**
   * Frees an expired idempotency-key from its finished job, re-checked under the row's lock: an
   * admin retry may have queued the job again meanwhile, and then its key still holds.
   */
  private async releaseKey(id: string, key: string | undefined, expiredBefore: Date): Promise<void> {
    await this.db.query(
      `UPDATE jobs SET idempotency_key = NULL
        WHERE id = $1 AND idempotency_key = $2 AND created_at <= $3 AND status IN ('completed', 'failed')`,
      [id, key, expiredBefore],
    );
  }

  /**
   * Deletes up to `limit` jobs that finished at or before `before`, except those in the
   * dead-letter queue (an admin still has to decide about them); returns how many. Rows another
   * sweeper has locked are skipped, not waited for, so instances sweeping at once share the work.
   */
  async deleteFinished(before: Date, limit: number): Promise<number> {
    const rows = await this.changed(
      `DELETE FROM jobs WHERE id IN (
         SELECT id FROM jobs
          WHERE status IN ('completed', 'failed') AND NOT dead_lettered AND completed_at <= $1
          ORDER BY completed_at
          LIMIT $2
          FOR UPDATE SKIP LOCKED)
       RETURNING id`,
      [before, limit],
    );
    return rows.length;
  }

  /** Undoes an insert whose submit the queue refused, so the 503 leaves nothing behind. */
  async remove(id: string): Promise<void> {
    // Never a job a repeat of the submit has taken over and queued meanwhile (enqueued_at set).
    await this.db.query(`DELETE FROM jobs WHERE id = $1 AND status = 'queued' AND attempts = 0 AND enqueued_at IS NULL`, [id]);
  }

  /** The queue took the job: from now on a repeat of its submit is answered with it. False when the record is gone. */
  async markEnqueued(id: string, now: Date): Promise<boolean> {
    const rows = await this.changed(`UPDATE jobs SET enqueued_at = COALESCE(enqueued_at, $2) WHERE id = $1 RETURNING id`, [id, now]);
    return rows.length > 0;
  }

  async find(id: string): Promise<JobRecord | undefined> {
    const rows = await this.db.query<Row[]>(`SELECT * FROM jobs WHERE id = $1`, [id]);
    return rows[0] ? toRecord(rows[0]) : undefined;
  }

  /**
   * One try begins: counted, marked running, and the submitting key's current state read in the
   * same round trip. A running job is taken over only when its heartbeat stopped before
   * `staleBefore` (its worker died): a live run that merely lost its queue lock must not be run
   * twice, which would call and charge the upstream twice. `'running_elsewhere'` is that refusal;
   * undefined, a job that is finished or gone. `orphanedAttempt`: a try of this process that ended
   * without writing its outcome, whose row is taken over at once if no other try took it since.
   */
  async start(
    id: string,
    now: Date,
    staleBefore: Date,
    orphanedAttempt?: number,
  ): Promise<{ job: JobRecord; key: KeyState | null } | 'running_elsewhere' | undefined> {
    const rows = await this.db.query<Row[]>(
      `WITH started AS (
         UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, $2), updated_at = $2,
                         -- Running proves it was queued, even if its submitter could not record that.
                         enqueued_at = COALESCE(enqueued_at, $2)
          WHERE id = $1 AND (status = 'queued' OR (status = 'running' AND (updated_at <= $3 OR attempts = $4)))
          RETURNING *)
       SELECT s.*, k.prefix AS key_prefix, k.role AS key_role, k.cache_scope AS key_cache_scope, k.expires_at AS key_expires_at
         FROM started s
         LEFT JOIN (SELECT ak.id, ak.prefix, u.role, d.cache_scope, ak.expires_at
                      FROM api_keys ak JOIN users u ON u.id = ak.user_id JOIN departments d ON d.id = u.department_id
                     WHERE ak.revoked_at IS NULL AND u.disabled_at IS NULL AND d.disabled_at IS NULL) k
           ON k.id = s.key_id`,
      [id, now, staleBefore, orphanedAttempt ?? null],
    );
    const row = rows[0];
    if (row) return { job: toRecord(row), key: keyState(row) ?? null };
    // Only the refused delivery pays for this read, and only to say why it did nothing.
    const current = await this.db.query<Array<{ status: JobStatus }>>(`SELECT status FROM jobs WHERE id = $1`, [id]);
    return current[0]?.status === 'running' ? 'running_elsewhere' : undefined;
  }

  /**
   * A live try says so, keeping its job from being taken over (start) or requeued (the sweep).
   * Only while the job is still its own `attempt`, as fail() and complete(): a try whose job was
   * taken over (its beats had stopped reaching the database) must not keep the takeover's row
   * fresh after the takeover died, or the job would stay running until this try gave up.
   */
  async heartbeat(id: string, now: Date, attempt: number): Promise<void> {
    await this.db.query(`UPDATE jobs SET updated_at = $2 WHERE id = $1 AND status = 'running' AND attempts = $3`, [id, now, attempt]);
  }

  /**
   * Back to queued, every job still marked running: for a process that alone runs this database's
   * jobs (the inline queue on the embedded database, which is locked to one process), at its start,
   * when any such row is a try its previous life left behind. Never on PostgreSQL, where a row that
   * says running may be another instance's live try.
   * `attempts` stay as they are, unlike retryLater(counted: false) for a try shutdown cut short
   * (which the processor saw end): a crashed try may have reached, and been charged by, the
   * upstream, and its request id (`job-<id>-<attempts>`) may already name a reservation and a
   * ledger row that the next try must not reuse. A stale run taken over by start() counts the same way.
   */
  async requeueRunning(now: Date): Promise<number> {
    const rows = await this.changed(`UPDATE jobs SET status = 'queued', updated_at = $1 WHERE status = 'running' RETURNING id`, [now]);
    return rows.length;
  }

  /** The key a job was submitted with as it is now, revoked or not: whom the job's audit rows name. */
  async keyOf(keyId: string): Promise<KeyState | undefined> {
    const rows = await this.db.query<Row[]>(
      `SELECT ak.prefix AS key_prefix, u.role AS key_role, d.cache_scope AS key_cache_scope, ak.expires_at AS key_expires_at
         FROM api_keys ak JOIN users u ON u.id = ak.user_id JOIN departments d ON d.id = u.department_id
        WHERE ak.id = $1`,
      [keyId],
    );
    return rows[0] ? keyState(rows[0]) : undefined;
  }

  /**
   * Back to queued after a transient failure of try `attempt`, keeping the last error visible while
   * it waits; nothing once another try took the job over (see fail()). `counted: false` for a try
   * shutdown cut short: it is not one of the job's JOBS_MAX_ATTEMPTS, or every rollout during a
   * long job would bring it closer to the dead-letter queue.
   */
  async retryLater(id: string, error: ErrorBody | null, now: Date, attempt?: number, counted = true): Promise<void> {
    await this.db.query(
      `UPDATE jobs SET status = 'queued', error = $2::jsonb, updated_at = $3, attempts = CASE WHEN $4 THEN attempts ELSE GREATEST(attempts - 1, 0) END
        WHERE id = $1 AND status = 'running' AND ($5::integer IS NULL OR attempts = $5)`,
      [id, error === null ? null : jsonb(error), now, counted, attempt ?? null],
    );
  }

  /** Stores the outcome of try `attempt`; undefined when the job finished or another try took it over meanwhile. */
  async complete(id: string, attempt: number, outcome: { result: unknown; model: string; costNanos: bigint }, now: Date): Promise<JobRecord | undefined> {
    const rows = await this.changed(
      `UPDATE jobs SET status = 'completed', result = $2::jsonb, error = NULL, model = $3, cost_nanos = $4, completed_at = $5, updated_at = $5
        WHERE id = $1 AND status = 'running' AND attempts = $6
        RETURNING *`,
      [id, jsonb(outcome.result), outcome.model, outcome.costNanos.toString(), now, attempt],
    );
    return rows[0] ? toRecord(rows[0]) : undefined;
  }

  /**
   * The job failed for good; `deadLettered` puts it in the dead-letter queue. Its place there is
   * `dead_lettered_at`, set the first time only (see listDead for why it never moves). A try's failure
   * names its `attempt`, and changes nothing once another try took the job over (complete() alike):
   * a try whose heartbeat went stale while it lived (its database connection hung) must not end the
   * job under the takeover, whose charged result would then be thrown away. Without `attempt` (the
   * queue giving up, which is no try) any unfinished job fails. `counted: false` for a try start()
   * counted but that never ran (refused before the pipeline).
   */
  async fail(id: string, error: ErrorBody, deadLettered: boolean, now: Date, attempt?: number, counted = true): Promise<JobRecord | undefined> {
    const rows = await this.changed(
      `UPDATE jobs SET status = 'failed', error = $2::jsonb, dead_lettered = $3, completed_at = $4, updated_at = $4,
                       dead_lettered_at = CASE WHEN $3 THEN COALESCE(dead_lettered_at, $4) ELSE dead_lettered_at END,
                       attempts = CASE WHEN $5 THEN attempts ELSE GREATEST(attempts - 1, 0) END
        WHERE id = $1 AND ${UNFINISHED} AND ($6::integer IS NULL OR (status = 'running' AND attempts = $6))
        RETURNING *`,
      [id, jsonb(error), deadLettered, now, counted, attempt ?? null],
    );
    return rows[0] ? toRecord(rows[0]) : undefined;
  }

  async counts(): Promise<StatusCounts> {
    const rows = await this.db.query<Array<{ status: JobStatus; dead_lettered: boolean; n: string | number }>>(
      `SELECT status, dead_lettered, count(*) AS n FROM jobs GROUP BY status, dead_lettered`,
    );
    const counts: StatusCounts = { queued: 0, running: 0, completed: 0, failed: 0, dead_lettered: 0 };
    for (const row of rows) {
      counts[row.status] += Number(row.n);
      if (row.dead_lettered) counts.dead_lettered += Number(row.n);
    }
    return counts;
  }

  /**
   * Newest first by `dead_lettered_at`, the moment a job first entered the dead-letter queue, after
   * the place `before` (deadListPlace) when given. The order and the cursor must use the same
   * column, and that column must never change: `before` is only an id, and the usual way through
   * the list (read a page, retry its jobs, ask for the page after the last id) dead-letters some of
   * those jobs again at once while the upstream still refuses. Were a job to move to the top when
   * dead-lettered again (its new `completed_at`), the next page would start at the top again and
   * repeat the jobs already handled, or, with the cursor at its old place but the list ordered by
   * the new one, skip the jobs between. So a job dead-lettered anew keeps its first place (its
   * `completed_at` and `error` still say when and why it failed last), and an admin's pass through
   * the list sees every job once; the next pass from the top finds those that failed again.
   * A job dead-lettered by an instance older than migration 1764400005200 (a rolling upgrade) has
   * no `dead_lettered_at`: its `completed_at` is its place (DEAD_PLACE), not the top of the list.
   */
  async listDead(limit: number, before: { completedAt: Date; id: string } | undefined): Promise<JobRecord[]> {
    const rows = before
      ? await this.db.query<Row[]>(
          `SELECT * FROM jobs WHERE dead_lettered AND (${DEAD_PLACE}, id) < ($2, $3) ORDER BY ${DEAD_PLACE} DESC, id DESC LIMIT $1`,
          [limit, before.completedAt, before.id],
        )
      : await this.db.query<Row[]>(`SELECT * FROM jobs WHERE dead_lettered ORDER BY ${DEAD_PLACE} DESC, id DESC LIMIT $1`, [limit]);
    return rows.map(toRecord);
  }

  /**
   * Where a job stands (or stood) in the dead-letter queue's order, whatever became of it since:
   * still there, retried (queued again, running, completed or dead-lettered anew) or discarded.
   * Undefined for a job that never was dead-lettered, or no job at all.
   */
  async deadListPlace(id: string): Promise<{ completedAt: Date; id: string } | undefined> {
    // A job retried before 1764400005200 has no known place (NULL); one still dead-lettered has its completed_at.
    const rows = await this.db.query<Array<{ id: string; place: Date | string | null }>>(
      `SELECT id, CASE WHEN dead_lettered THEN ${DEAD_PLACE} ELSE dead_lettered_at END AS place FROM jobs WHERE id = $1`,
      [id],
    );
    const row = rows[0];
    return row?.place ? { completedAt: toDate(row.place), id: row.id } : undefined;
  }

  async findDead(id: string): Promise<JobRecord | undefined> {
    const rows = await this.db.query<Row[]>(`SELECT * FROM jobs WHERE id = $1 AND dead_lettered`, [id]);
    return rows[0] ? toRecord(rows[0]) : undefined;
  }

  /** An admin retry: out of the dead-letter queue, with a fresh set of tries. */
  async resetDead(id: string, now: Date): Promise<JobRecord | undefined> {
    const rows = await this.changed(
      `UPDATE jobs SET status = 'queued', dead_lettered = false, attempts = 0, error = NULL, result = NULL,
                       started_at = NULL, completed_at = NULL, updated_at = $2
        WHERE id = $1 AND dead_lettered
        RETURNING *`,
      [id, now],
    );
    return rows[0] ? toRecord(rows[0]) : undefined;
  }

  /** Puts a dead job back as it was when its retry could not be queued. */
  async restoreDead(job: JobRecord): Promise<void> {
    await this.db.query(
      `UPDATE jobs SET status = 'failed', dead_lettered = true, attempts = $2, error = $3::jsonb, started_at = $4, completed_at = $5, updated_at = $5
        WHERE id = $1 AND status = 'queued' AND attempts = 0`,
      [job.id, job.attempts, job.error === null ? null : JSON.stringify(job.error), job.startedAt, job.completedAt],
    );
  }

  /** Removes a job from the dead-letter queue; its record stays, failed, for its submitter to read. */
  async discardDead(id: string, now: Date): Promise<boolean> {
    const rows = await this.changed(`UPDATE jobs SET dead_lettered = false, updated_at = $2 WHERE id = $1 AND dead_lettered RETURNING id`, [id, now]);
    return rows.length > 0;
  }

  /**
   * The rows an `UPDATE … RETURNING` changed. Wrapped in a CTE because TypeORM's postgres driver
   * answers a bare UPDATE with `[rows, rowCount]` instead of the rows.
   */
  private changed(updateReturning: string, parameters: unknown[]): Promise<Row[]> {
    return this.db.query<Row[]>(`WITH changed AS (${updateReturning}) SELECT * FROM changed`, parameters);
  }

  /** Unfinished jobs nobody touched since `before`: candidates for a (harmless, idempotent) requeue. */
  async unfinishedSince(before: Date, limit: number): Promise<string[]> {
    const rows = await this.db.query<Array<{ id: string }>>(`SELECT id FROM jobs WHERE ${UNFINISHED} AND updated_at <= $1 ORDER BY updated_at LIMIT $2`, [
      before,
      limit,
    ]);
    return rows.map((r) => r.id);
  }
}

/** A key's state from the `key_*` columns the queries above select; undefined when no key row joined. */
function keyState(row: Row): KeyState | undefined {
  if (typeof row.key_prefix !== 'string') return undefined;
  return { prefix: row.key_prefix, role: row.key_role as UserRole, cacheScope: row.key_cache_scope as CacheScope, expiresAt: toDateOrNull(row.key_expires_at) };
}

function toRecord(row: Row): JobRecord {
  return {
    id: row.id as string,
    userId: row.user_id as string,
    departmentId: row.department_id as string,
    keyId: row.key_id as string,
    status: row.status as JobStatus,
    door: row.door as JobRecord['door'],
    requestBody: json(row.request_body) as JobRecord['requestBody'],
    taskType: (row.task_type as string | null) ?? null,
    cacheControl: json(row.cache_control) as JobRecord['cacheControl'],
    requestId: row.request_id as string,
    result: json(row.result) ?? null,
    error: (json(row.error) as ErrorBody | null) ?? null,
    model: (row.model as string | null) ?? null,
    costNanos: row.cost_nanos === null || row.cost_nanos === undefined ? null : BigInt(row.cost_nanos as string),
    attempts: Number(row.attempts),
    deadLettered: row.dead_lettered === true,
    idempotencyKey: (row.idempotency_key as string | null) ?? null,
    bodyHash: row.body_hash as string,
    callbackUrl: (row.callback_url as string | null) ?? null,
    createdAt: toDate(row.created_at),
    enqueuedAt: toDateOrNull(row.enqueued_at),
    startedAt: toDateOrNull(row.started_at),
    completedAt: toDateOrNull(row.completed_at),
  };
}

/**
 * A try's outcome as jsonb text. jsonb cannot hold U+0000 or a lone surrogate (PostgreSQL refuses
 * the whole value) and an upstream can send either, e.g. an emoji cut in half as `\ud83d`: each
 * becomes U+FFFD, the character for one that could not be represented, rather than the write
 * failing and a result that was paid for being lost. Keys too: a completion's logprobs may be
 * keyed by token.
 */
function jsonb(value: unknown): string {
  return JSON.stringify(value, (_key, item: unknown) => {
    if (typeof item === 'string') return storable(item);
    if (item === null || typeof item !== 'object' || Array.isArray(item) || !Object.keys(item).some((key) => SUSPECT.test(key))) return item;
    return Object.fromEntries(Object.entries(item).map(([key, inner]) => [storable(key), inner as unknown]));
  });
}

function storable(text: string): string {
  return SUSPECT.test(text) ? text.replace(UNSTORABLE, '\uFFFD') : text;
}

// pg parses jsonb already; a driver that hands back the text of an object is tolerated.
function json(value: unknown): unknown {
  return typeof value === 'string' && /^\s*[{[]/.test(value) ? (JSON.parse(value) as unknown) : value;
}

function toDate(value: unknown): Date {
  return value instanceof Date ? value : new Date(value as string);
}

function toDateOrNull(value: unknown): Date | null {
  return value === null || value === undefined ? null : toDate(value);
}
