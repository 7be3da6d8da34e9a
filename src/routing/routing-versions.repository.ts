import { Injectable } from '@nestjs/common';
import { DataSource } from 'typeorm';
import type { RoutingTable, RoutingTableBody } from './routing-table.js';

interface VersionRow {
  version: number;
  body: RoutingTableBody;
  created_at: Date | string;
  created_by: string;
  comment: string | null;
  based_on: number | null;
  restored_from: number | null;
}

const COLUMNS = 'version, body, created_at, created_by, comment, based_on, restored_from';

export interface NewVersion {
  /** The version the author started from; the write succeeds only if it is still the latest. */
  basedOn: number;
  body: RoutingTableBody;
  author: string;
  comment: string | null;
  restoredFrom?: number;
}

/** The SQL of routing_versions (append-only: a change or a rollback is a new row). */
@Injectable()
export class RoutingVersionsRepository {
  constructor(private readonly dataSource: DataSource) {}

  async seed(body: RoutingTableBody): Promise<void> {
    await this.dataSource.query(
      `INSERT INTO routing_versions (version, body, created_by, comment) VALUES (1, $1, 'system', 'seed: reference table') ON CONFLICT DO NOTHING`,
      [JSON.stringify(body)],
    );
  }

  /** The one query every instance runs each poll: an index-only max on the primary key. */
  async latestVersion(): Promise<number | null> {
    const [row] = await this.dataSource.query<Array<{ version: number | string | null }>>('SELECT max(version) AS version FROM routing_versions');
    return row?.version == null ? null : Number(row.version);
  }

  async latest(): Promise<RoutingTable | undefined> {
    const [row] = await this.dataSource.query<VersionRow[]>(`SELECT ${COLUMNS} FROM routing_versions ORDER BY version DESC LIMIT 1`);
    return row && toTable(row);
  }

  async get(version: number): Promise<RoutingTable | undefined> {
    const [row] = await this.dataSource.query<VersionRow[]>(`SELECT ${COLUMNS} FROM routing_versions WHERE version = $1`, [version]);
    return row && toTable(row);
  }

  async list(limit: number, before: number | undefined): Promise<RoutingTable[]> {
    const rows =
      before === undefined
        ? await this.dataSource.query<VersionRow[]>(`SELECT ${COLUMNS} FROM routing_versions ORDER BY version DESC LIMIT $1`, [limit])
        : await this.dataSource.query<VersionRow[]>(`SELECT ${COLUMNS} FROM routing_versions WHERE version < $2 ORDER BY version DESC LIMIT $1`, [
            limit,
            before,
          ]);
    return rows.map(toTable);
  }

  /**
   * Appends version basedOn + 1, atomically conditional on basedOn still being the latest: the
   * WHERE sees a newer committed version, and two writers racing for the same number collide on
   * the primary key, where ON CONFLICT makes the loser insert nothing. Either way the loser gets
   * undefined (a 409), never a lost update, on PostgreSQL and PGlite alike.
   */
  async append(v: NewVersion): Promise<RoutingTable | undefined> {
    const rows = await this.dataSource.query<VersionRow[]>(
      `INSERT INTO routing_versions (version, body, created_by, comment, based_on, restored_from)
       SELECT $1::integer + 1, $2::jsonb, $3, $4, $1::integer, $5::integer
       WHERE (SELECT max(version) FROM routing_versions) = $1::integer
       ON CONFLICT (version) DO NOTHING
       RETURNING ${COLUMNS}`,
      [v.basedOn, JSON.stringify(v.body), v.author, v.comment, v.restoredFrom ?? null],
    );
    const [row] = rows;
    return row && toTable(row);
  }
}

function toTable(row: VersionRow): RoutingTable {
  return {
    version: Number(row.version),
    ...row.body,
    updated_at: new Date(row.created_at).toISOString(),
    updated_by: row.created_by,
    comment: row.comment,
    based_on: row.based_on == null ? null : Number(row.based_on),
    restored_from: row.restored_from == null ? null : Number(row.restored_from),
  };
}
