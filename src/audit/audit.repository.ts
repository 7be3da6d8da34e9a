import { Injectable } from '@nestjs/common';
import { DataSource, type EntityManager } from 'typeorm';
import { type AuditEvent, canonicalEvent, chainHash, GENESIS_HASH, type JsonObject, linkHash, type StoredAuditEvent } from './audit-event.js';

export interface AuditQuery {
  /** A user id or key id (uuid), or a key prefix (authentication failures have only that). */
  actor?: string;
  /** Exact action, or a prefix when it ends with `*` (`POST /admin/keys*`). */
  action?: string;
  from?: Date;
  to?: Date;
  /** Only events with seq below this (keyset pagination, newest first). */
  beforeSeq?: string;
  limit: number;
}

export interface AuditVerifyRange {
  fromSeq?: string;
  toSeq?: string;
  from?: Date;
  to?: Date;
}

export interface AuditVerifyResult {
  ok: boolean;
  checked: number;
  /** seq of the first event whose link or hash does not recompute; null when the chain holds. */
  first_break: number | null;
  /** The chain head when verification started: record it elsewhere to detect a rewritten chain later. */
  head: { seq: number; hash: string };
}

interface Row {
  seq: string;
  id: string;
  at: Date | string;
  actor_user_id: string | null;
  actor_key_id: string | null;
  actor_role: string | null;
  action: string;
  target_type: string | null;
  target_id: string | null;
  request_id: string | null;
  status: number | null;
  details: JsonObject | null;
  prev_hash: string;
  hash: string;
}

const COLUMNS = 'seq, id, at, actor_user_id, actor_key_id, actor_role, action, target_type, target_id, request_id, status, details, prev_hash, hash';
const VERIFY_PAGE = 2000;

// One statement for the whole batch, with the rows as ONE json parameter: no 65k parameter
// limit, one parse, and no per-element escaping in JavaScript (13 array parameters cost pg's, the
// largest audit item in the profile; the text is the events' canonical JSON, see append). Rows are
// inserted in array order so seq follows the chain, and the statement checks that itself: it
// answers one row (how many were stored, how many sit out of chain order, the last seq) instead
// of RETURNING every row for the client to compare, which had pg parse a result row per event.
const INSERT_BATCH = `WITH input AS MATERIALIZED (
  SELECT e.v, e.ord FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, ord)
), ins AS (
  INSERT INTO audit_events (id, at, actor_user_id, actor_key_id, actor_role, action, target_type, target_id, request_id, status, details, prev_hash, hash)
  SELECT (v->>'id')::uuid, (v->>'at')::timestamptz, (v->>'actor_user_id')::uuid, (v->>'actor_key_id')::uuid, v->>'actor_role', v->>'action',
         v->>'target_type', v->>'target_id', v->>'request_id', (v->>'status')::int, v->'details', v->>'prev_hash', v->>'hash'
    FROM input
   ORDER BY ord
  RETURNING seq, hash
), numbered AS (
  SELECT seq, hash, row_number() OVER (ORDER BY seq) AS rn FROM ins
)
SELECT count(*)::int AS stored,
       (count(*) FILTER (WHERE i.v->>'hash' IS DISTINCT FROM n.hash))::int AS misplaced,
       max(n.seq)::text AS last_seq
  FROM numbered n LEFT JOIN input i ON i.ord = n.rn`;

/** The audit table's SQL: chained batch appends, filtered reads, chain verification. */
@Injectable()
export class AuditRepository {
  constructor(private readonly dataSource: DataSource) {}

  /**
   * Appends `events` as one transaction: lock the chain head, hash each event onto it, one
   * multi-row INSERT, move the head. Writers on other instances wait on the head's row lock, so
   * the chain stays linear across the fleet (and on PGlite the lock is simply uncontended).
   * `skipExisting`: after an ambiguous failure (the COMMIT may have landed), events already
   * stored are left out instead of failing the batch on their unique id.
   */
  async append(events: readonly AuditEvent[], skipExisting: boolean): Promise<number> {
    if (events.length === 0) return 0;
    return this.dataSource.transaction(async (manager) => {
      const head = await lockHead(manager);
      let batch = events;
      if (skipExisting) {
        const stored = await manager.query<Array<{ id: string }>>('SELECT id FROM audit_events WHERE id = ANY($1::uuid[])', [events.map((e) => e.id)]);
        const storedIds = new Set(stored.map((r) => r.id));
        batch = events.filter((e) => !storedIds.has(e.id));
        if (batch.length === 0) return 0;
      }
      // The canonical text each hash covers is also the row's JSON: its keys are the column names
      // (canonicalEvent), and canonicalJson writes valid JSON for every JsonValue. So the batch
      // parameter is those texts with the two chain columns appended, not a second serialisation
      // of row objects (BENCHMARKS.md session 6). Joined from pieces, not built with `+=`: pg
      // measures the parameter with Buffer.byteLength, which is ~30x slower on a rope of
      // thousands of concatenations than on the flat string join() returns.
      let prev = head.hash;
      const pieces: string[] = [];
      for (const [i, event] of batch.entries()) {
        const text = canonicalEvent(event);
        const prevHash = prev;
        prev = linkHash(prevHash, text);
        pieces.push(i === 0 ? '[' : ',', text.slice(0, -1), ',"prev_hash":"', prevHash, '","hash":"', prev, '"}');
      }
      pieces.push(']');
      const rows = pieces.join('');
      const [result] = await manager.query<Array<{ stored: number; misplaced: number; last_seq: string | null }>>(INSERT_BATCH, [rows]);
      // Cheap insurance for the ordering assumption above: a chain stored out of order would
      // report as broken forever, so refuse to commit one.
      if (!result || result.stored !== batch.length || result.misplaced !== 0 || result.last_seq === null) {
        throw new Error('audit batch stored out of chain order; rolled back');
      }
      await manager.query('UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1', [result.last_seq, prev]);
      return batch.length;
    });
  }

  async list(query: AuditQuery): Promise<{ events: StoredAuditEvent[]; nextCursor: string | null }> {
    const where: string[] = [];
    const params: unknown[] = [];
    const param = (value: unknown): string => {
      params.push(value);
      return `$${params.length}`;
    };
    if (query.actor !== undefined) {
      if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(query.actor)) {
        const p = param(query.actor.toLowerCase());
        where.push(`(actor_user_id = ${p}::uuid OR actor_key_id = ${p}::uuid)`);
      } else {
        where.push(`details->>'key_prefix' = ${param(query.actor)}`);
      }
    }
    if (query.action !== undefined) {
      if (query.action.endsWith('*')) {
        const prefix = query.action.slice(0, -1);
        where.push(`left(action, ${param(prefix.length)}) = ${param(prefix)}`);
      } else {
        where.push(`action = ${param(query.action)}`);
      }
    }
    if (query.from !== undefined) where.push(`at >= ${param(query.from.toISOString())}`);
    if (query.to !== undefined) where.push(`at < ${param(query.to.toISOString())}`);
    if (query.beforeSeq !== undefined) where.push(`seq < ${param(query.beforeSeq)}::bigint`);
    const sql = `SELECT ${COLUMNS} FROM audit_events ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY seq DESC LIMIT ${param(query.limit + 1)}`;
    const rows = await this.dataSource.query<Row[]>(sql, params);
    const more = rows.length > query.limit;
    const events = rows.slice(0, query.limit).map(fromRow);
    return { events, nextCursor: more ? (events.at(-1)?.seq ?? null) : null };
  }

  /**
   * Recomputes the chain over a seq range (dates are turned into the seq range they cover).
   * Reads the head first: every row at or below it was committed with it, so concurrent writers
   * never make a healthy chain look broken. Without an upper bound, the last row must also be the
   * one the head names, which catches a deleted tail, and no row may lie past the head: the writer
   * moves the head in the transaction that adds rows, so a committed row beyond it was added
   * behind the writer's back (a plain INSERT, which the append-only trigger allows), and would be
   * listed by GET /admin/audit while the chain it claims to extend held: a break of any range that
   * holds it, open-ended or not. Read with the head in one
   * statement, so one snapshot: a writer's commit adds both or neither.
   */
  async verify(range: AuditVerifyRange): Promise<AuditVerifyResult> {
    const headRows = await this.dataSource.query<Array<{ seq: string; hash: string; beyond: string | null }>>(
      'SELECT seq, hash, (SELECT min(e.seq) FROM audit_events e WHERE e.seq > h.seq) AS beyond FROM audit_chain_head h WHERE id = 1',
    );
    const head = headRows[0] ?? { seq: '0', hash: GENESIS_HASH, beyond: null };
    const headView = { seq: Number(head.seq), hash: head.hash };
    let lower = range.fromSeq ?? '1';
    let upper = head.seq;
    // The range as asked, before it is cut at the head: a row past the head inside it is a break.
    let asked = range.toSeq;
    if (range.toSeq !== undefined && compareSeq(range.toSeq, upper) < 0) upper = range.toSeq;
    if (range.from !== undefined) {
      const [row] = await this.dataSource.query<Array<{ seq: string | null }>>('SELECT min(seq) AS seq FROM audit_events WHERE at >= $1', [
        range.from.toISOString(),
      ]);
      if (row?.seq == null) {
        // Nothing at or after `from`. A closed range has nothing to check; an open one still ends
        // at the head, whose row must be there: a tail deleted from before `from` on leaves no
        // row to find, and only the head gives it away. So the head's own link is checked.
        if (range.toSeq !== undefined || range.to !== undefined || head.seq === '0') return { ok: true, checked: 0, first_break: null, head: headView };
        lower = head.seq;
      } else if (compareSeq(row.seq, lower) > 0) lower = row.seq;
    }
    if (range.to !== undefined) {
      const [row] = await this.dataSource.query<Array<{ seq: string | null }>>('SELECT max(seq) AS seq FROM audit_events WHERE at < $1', [
        range.to.toISOString(),
      ]);
      if (row?.seq == null) return { ok: true, checked: 0, first_break: null, head: headView };
      if (asked === undefined || compareSeq(row.seq, asked) < 0) asked = row.seq;
      if (compareSeq(row.seq, upper) < 0) upper = row.seq;
    }
    const openEnded = range.toSeq === undefined && range.to === undefined;

    const [anchor] = await this.dataSource.query<Array<{ hash: string }>>('SELECT hash FROM audit_events WHERE seq < $1::bigint ORDER BY seq DESC LIMIT 1', [
      lower,
    ]);
    let expectedPrev = anchor?.hash ?? GENESIS_HASH;
    let checked = 0;
    let lastSeq: string | undefined;
    let after = (BigInt(lower) - 1n).toString();
    for (;;) {
      // The hash covers `at` to the millisecond (as the gateway writes it); the column keeps
      // microseconds, so an edit below a millisecond would hash the same. Only such an edit
      // leaves microseconds that are not whole milliseconds.
      const rows = await this.dataSource.query<Array<Row & { sub_ms: boolean }>>(
        `SELECT ${COLUMNS}, (extract(microseconds FROM at)::bigint % 1000) <> 0 AS sub_ms
           FROM audit_events WHERE seq > $1::bigint AND seq <= $2::bigint ORDER BY seq LIMIT ${VERIFY_PAGE}`,
        [after, upper],
      );
      for (const row of rows) {
        checked += 1;
        const event = fromRow(row);
        if (row.sub_ms || event.prevHash !== expectedPrev || chainHash(event.prevHash, event) !== event.hash) {
          return { ok: false, checked, first_break: Number(event.seq), head: headView };
        }
        expectedPrev = event.hash;
        lastSeq = event.seq;
      }
      if (rows.length < VERIFY_PAGE) break;
      after = rows.at(-1)?.seq ?? upper;
    }
    if (openEnded && head.seq !== '0' && compareSeq(lower, head.seq) <= 0 && (lastSeq !== head.seq || expectedPrev !== head.hash)) {
      return { ok: false, checked, first_break: Number(head.seq), head: headView };
    }
    const beyond = head.beyond;
    if (beyond !== null && compareSeq(beyond, lower) >= 0 && (asked === undefined || compareSeq(beyond, asked) <= 0)) {
      return { ok: false, checked, first_break: Number(beyond), head: headView };
    }
    return { ok: true, checked, first_break: null, head: headView };
  }
}

async function lockHead(manager: EntityManager): Promise<{ seq: string; hash: string }> {
  const rows = await manager.query<Array<{ seq: string; hash: string }>>('SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE');
  const head = rows[0];
  if (!head) throw new Error('audit_chain_head is missing its row (migration AuditEvents1764400004000 not applied?)');
  return head;
}

function compareSeq(a: string, b: string): number {
  const x = BigInt(a);
  const y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
}

function fromRow(row: Row): StoredAuditEvent {
  return {
    seq: String(row.seq),
    id: row.id,
    at: row.at instanceof Date ? row.at : new Date(row.at),
    actorUserId: row.actor_user_id,
    actorKeyId: row.actor_key_id,
    actorRole: row.actor_role,
    action: row.action,
    targetType: row.target_type,
    targetId: row.target_id,
    requestId: row.request_id,
    status: row.status === null ? null : Number(row.status),
    details: row.details ?? {},
    prevHash: row.prev_hash,
    hash: row.hash,
  };
}
