import { Injectable } from '@nestjs/common';
import pg from 'pg';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { Database } from '../database/database.module.js';

/** A statement of this module, sent as a named prepared statement on PostgreSQL. */
export interface BudgetStatement {
  /** Unique per SQL text: pg prepares it once per connection and then only binds and executes. */
  readonly name: string;
  readonly text: string;
}

/**
 * Where the budget's statements go. On PostgreSQL, two small `pg` pools of its own instead of
 * TypeORM's query runner (which costs more gateway CPU per statement than the statement itself):
 *
 * - `hold` (reserve, on the request path): `synchronous_commit=off`. A reservation is a transient
 *   hold, not money; README.md says why losing the last moments of holds in a crash is safe.
 * - `write` (the batched settle and ledger flush): one connection, normal synchronous commit,
 *   because that is the money.
 *
 * On PGlite everything goes through the one DataSource: it is in-process, with no fsync cost to
 * avoid and only one session to share.
 */
@Injectable()
export class BudgetDatabase {
  private readonly logger: Logger;
  private readonly holds: pg.Pool | undefined;
  private readonly writes: pg.Pool | undefined;
  private closed: Promise<void> | undefined;
  /**
   * How long after a reservation failed on our side its statement may still commit on the
   * server's (BudgetService releases what it may have held once this has passed): the hold
   * pool's statement_timeout, counted from when the server got the statement, so by then it has
   * committed or been cancelled unless the network held it back that long. 0 on PGlite, where a
   * statement that failed was rolled back.
   */
  readonly holdSettleMs: number = 0;

  constructor(
    private readonly dataSource: DataSource,
    database: Database,
    config: AppConfig,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'BudgetDatabase' });
    if (database.kind === 'postgres' && config.database.driver === 'postgres') {
      const common = { connectionString: config.database.url, connectionTimeoutMillis: 5000, statement_timeout: 30_000, idleTimeoutMillis: 60_000 };
      // query_timeout is the client's own: a server that stops answering (frozen, packets
      // dropped) cannot enforce statement_timeout. A reservation is on a request's path: it gives
      // up after DATABASE_REQUEST_TIMEOUT_MS (503, the connection is discarded); the writer, off
      // the path, a little after the server's own limit, then retries.
      // The server stops a reservation at the same limit: one the client gave up on while it
      // waited on a row lock would otherwise run on and commit a hold nobody settles.
      this.holds = this.pool({
        ...common,
        max: config.budget.poolSize,
        options: '-c synchronous_commit=off',
        application_name: 'gatehouse-budget-hold',
        connectionTimeoutMillis: Math.min(common.connectionTimeoutMillis, config.databaseRequestTimeoutMs),
        statement_timeout: config.databaseRequestTimeoutMs,
        query_timeout: config.databaseRequestTimeoutMs,
      });
      this.holdSettleMs = config.databaseRequestTimeoutMs;
      this.writes = this.pool({ ...common, max: 1, application_name: 'gatehouse-budget-write', query_timeout: 35_000 });
    }
  }

  /** A reservation (request path): one round trip, asynchronously committed on PostgreSQL. */
  hold<T>(statement: BudgetStatement, params: readonly unknown[]): Promise<T[]> {
    return this.run<T>(this.holds, statement, params);
  }

  /** Money (settles, ledger rows): synchronously committed. */
  write<T>(statement: BudgetStatement, params: readonly unknown[]): Promise<T[]> {
    return this.run<T>(this.writes, statement, params);
  }

  /** After the writer's last flush; idempotent. */
  close(): Promise<void> {
    this.closed ??= Promise.all([this.holds?.end(), this.writes?.end()]).then(() => undefined);
    return this.closed;
  }

  private async run<T>(pool: pg.Pool | undefined, statement: BudgetStatement, params: readonly unknown[]): Promise<T[]> {
    if (!pool) return await this.dataSource.query<T[]>(statement.text, [...params]);
    const result = await pool.query({ name: statement.name, text: statement.text, values: [...params] });
    return result.rows as T[];
  }

  private pool(config: pg.PoolConfig): pg.Pool {
    const pool = new pg.Pool(config);
    // An idle connection the server drops (restart, failover, pg_terminate_backend) is reported
    // here; unhandled, the 'error' event would end the process. The next query reconnects.
    pool.on('error', (error) => this.logger.warn({ pool: config.application_name, err: error.message }, 'idle budget database connection lost'));
    return pool;
  }
}
