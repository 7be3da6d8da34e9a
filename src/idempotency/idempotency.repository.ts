import { Injectable } from '@nestjs/common';
import { DataSource } from 'typeorm';
import type { IdempotencyRow, StoredResponse } from './idempotency.types.js';

type Row = Record<string, unknown>;

/** Which rows a new call may take over: a done row past its window, or a running one whose heartbeat stopped. */
export interface Takeover {
  /** Done rows created at or before this have expired. */
  expiredBefore: Date;
  /** Running rows whose heartbeat is this old or older were abandoned (their process died). */
  staleBefore: Date;
}

const TAKEOVER = `(k.state = 'done' AND k.created_at <= $7) OR (k.state = 'running' AND k.updated_at <= $8)`;

/** Idempotency keys of sync calls, in SQL that runs unchanged on PostgreSQL and PGlite. */
@Injectable()
export class IdempotencyRepository {
  constructor(private readonly db: DataSource) {}

  /**
   * Claims a key for a call, in one statement: a new row, or an expired or abandoned one taken
   * over. False when another call holds it (running) or answered it (done) within its window;
   * the primary key settles concurrent claims, and a conflicting row is locked while its
   * takeover is decided, so two calls never both take over the same row.
   */
  async claim(userId: string, key: string, bodyHash: string, claimId: string, requestId: string, now: Date, takeover: Takeover): Promise<boolean> {
    const rows = await this.db.query<Row[]>(
      `INSERT INTO idempotency_keys AS k (user_id, idempotency_key, body_hash, state, claim_id, request_id, created_at, updated_at)
       VALUES ($1, $2, $3, 'running', $4, $5, $6, $6)
       ON CONFLICT (user_id, idempotency_key) DO UPDATE
          SET body_hash = EXCLUDED.body_hash, state = 'running', claim_id = EXCLUDED.claim_id, request_id = EXCLUDED.request_id,
              created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, response_meta = NULL, response_body = NULL
        WHERE ${TAKEOVER}
       RETURNING k.claim_id`,
      [userId, key, bodyHash, claimId, requestId, now, takeover.expiredBefore, takeover.staleBefore],
    );
    return rows.length > 0;
  }

  /**
   * Whether an async job of this user holds the key (sync calls and async submits share one key
   * space per user): its job is unfinished, or was submitted within the window. The same rule by
   * which JobsRepository.insert releases a job's key; a job whose key expired does not block.
   */
  async heldByJob(userId: string, key: string, expiredBefore: Date): Promise<boolean> {
    const rows = await this.db.query<Row[]>(
      `SELECT 1 FROM jobs
        WHERE user_id = $1 AND idempotency_key = $2 AND (created_at > $3 OR status IN ('queued', 'running'))
        LIMIT 1`,
      [userId, key, expiredBefore],
    );
    return rows.length > 0;
  }

  async find(userId: string, key: string): Promise<IdempotencyRow | undefined> {
    const rows = await this.db.query<Row[]>(
      `SELECT body_hash, state, created_at, updated_at, response_meta, response_body FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2`,
      [userId, key],
    );
    const row = rows[0];
    return row === undefined ? undefined : toRow(row);
  }

  /** A live call says so, keeping its claim from being taken over. False once the claim is no longer its own. */
  async heartbeat(userId: string, key: string, claimId: string, now: Date): Promise<boolean> {
    const rows = await this.changed(
      `UPDATE idempotency_keys SET updated_at = $4 WHERE user_id = $1 AND idempotency_key = $2 AND claim_id = $3 AND state = 'running' RETURNING claim_id`,
      [userId, key, claimId, now],
    );
    return rows.length > 0;
  }

  /** The call answered: its repeats get this. False when the claim was taken over meanwhile (it is then not this call's to fill). */
  async finish(userId: string, key: string, claimId: string, now: Date, response: StoredResponse): Promise<boolean> {
    const { meta, body } = encodeResponse(response);
    const rows = await this.changed(
      `UPDATE idempotency_keys SET state = 'done', updated_at = $4, response_meta = $5, response_body = $6
        WHERE user_id = $1 AND idempotency_key = $2 AND claim_id = $3 AND state = 'running' RETURNING claim_id`,
      [userId, key, claimId, now, meta, body],
    );
    return rows.length > 0;
  }

  /** The call failed: the key is free again, so a retry runs. Never a row another call has taken over, nor a done one. */
  async release(userId: string, key: string, claimId: string): Promise<boolean> {
    const rows = await this.changed(
      `DELETE FROM idempotency_keys WHERE user_id = $1 AND idempotency_key = $2 AND claim_id = $3 AND state = 'running' RETURNING claim_id`,
      [userId, key, claimId],
    );
    return rows.length > 0;
  }

  /** Deletes up to `limit` rows nobody may use any more: expired done rows, and abandoned running ones as old. Returns how many. */
  async deleteExpired(takeover: Takeover, limit: number): Promise<number> {
    const rows = await this.changed(
      `DELETE FROM idempotency_keys WHERE (user_id, idempotency_key) IN (
         SELECT user_id, idempotency_key FROM idempotency_keys
          WHERE created_at <= $1 AND (state = 'done' OR updated_at <= $2)
          LIMIT $3)
         -- Again outside: on PostgreSQL a row the subquery picked, then a claim took over while
         -- this waited for its lock, is re-read here and must survive (it is fresh and running).
         AND created_at <= $1 AND (state = 'done' OR updated_at <= $2)
       RETURNING claim_id`,
      [takeover.expiredBefore, takeover.staleBefore, limit],
    );
    return rows.length;
  }

  private changed(statement: string, parameters: unknown[]): Promise<Row[]> {
    return this.db.query<Row[]>(`WITH changed AS (${statement}) SELECT * FROM changed`, parameters);
  }
}

/** Meta as JSON text, and the body as sent (JSON) or the events as a JSON array (SSE). */
function encodeResponse(response: StoredResponse): { meta: string; body: string } {
  const meta = JSON.stringify({ kind: response.kind, headers: response.headers, model: response.model, route: response.route });
  return { meta, body: response.kind === 'json' ? response.body : JSON.stringify(response.events) };
}

function decodeResponse(meta: unknown, body: unknown): StoredResponse | undefined {
  if (typeof meta !== 'string' || typeof body !== 'string') return undefined;
  const common = JSON.parse(meta) as Omit<StoredResponse, 'body' | 'events'>;
  return common.kind === 'sse' ? { ...common, kind: 'sse', events: JSON.parse(body) as string[] } : { ...common, kind: 'json', body };
}

function toRow(row: Row): IdempotencyRow {
  return {
    bodyHash: row.body_hash as string,
    state: row.state as IdempotencyRow['state'],
    createdAt: toDate(row.created_at),
    updatedAt: toDate(row.updated_at),
    response: decodeResponse(row.response_meta, row.response_body),
  };
}

function toDate(value: unknown): Date {
  return value instanceof Date ? value : new Date(value as string);
}
