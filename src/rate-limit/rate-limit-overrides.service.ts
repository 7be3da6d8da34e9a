import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import type { Logger } from 'pino';
import { DataSource } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';

export type LimitScope = 'key' | 'user' | 'department';

export interface Limit {
  requestsPerMinute: number;
  tokensPerMinute: number | undefined;
}

export interface LimitView extends Limit {
  scope: LimitScope;
  id: string;
  source: 'override' | 'default';
  updatedAt: string | undefined;
  updatedBy: string | undefined;
}

interface OverrideRow {
  scope: LimitScope;
  subject_id: string;
  requests_per_minute: number;
  tokens_per_minute: string | number | null;
  updated_at: Date;
  updated_by: string;
}

/** Held by every override change while it commits (RateLimitOverrides.change). */
const OVERRIDES_CHANGE_LOCK = 7_263_101;

const SUBJECT_TABLE: Record<LimitScope, string> = { key: 'api_keys', user: 'users', department: 'departments' };

/**
 * Admin overrides of the configured limits. Requests read an in-memory snapshot (no database
 * round trip per request); every instance notices a change within `routing.refreshMs` by polling
 * one cheap aggregate, like the routing table does. The instance that took the change applies it
 * at once.
 */
@Injectable()
export class RateLimitOverrides implements OnModuleInit, OnApplicationShutdown {
  private snapshot = new Map<string, Limit>();
  private stamp = '';
  private timer: NodeJS.Timeout | undefined;
  private refreshing: Promise<void> | undefined;
  private readonly logger: Logger;

  constructor(
    private readonly dataSource: DataSource,
    private readonly config: AppConfig,
    appLogger: AppLogger,
  ) {
    this.logger = appLogger.logger.child({ context: 'RateLimit' });
  }

  async onModuleInit(): Promise<void> {
    await this.reload(await this.readStamp());
    this.timer = setInterval(() => void this.refresh(), this.config.routing.refreshMs);
    this.timer.unref();
  }

  onApplicationShutdown(): void {
    if (this.timer) clearInterval(this.timer);
  }

  get(scope: LimitScope, id: string): Limit | undefined {
    return this.snapshot.size === 0 ? undefined : this.snapshot.get(`${scope}:${id}`);
  }

  /** The configured default of a scope. */
  defaults(scope: LimitScope): Limit {
    const c = this.config.rateLimit;
    switch (scope) {
      case 'key':
        return { requestsPerMinute: c.keyRpm, tokensPerMinute: c.keyTpm };
      case 'user':
        return { requestsPerMinute: c.userRpm, tokensPerMinute: c.userTpm };
      case 'department':
        return { requestsPerMinute: c.departmentRpm, tokensPerMinute: c.departmentTpm };
    }
  }

  refresh(): Promise<void> {
    this.refreshing ??= this.pollOnce().finally(() => {
      this.refreshing = undefined;
    });
    return this.refreshing;
  }

  async view(scope: LimitScope, id: string): Promise<LimitView> {
    await this.mustExist(scope, id);
    const [row] = await this.dataSource.query<OverrideRow[]>('SELECT * FROM rate_limit_overrides WHERE scope = $1 AND subject_id = $2', [scope, id]);
    if (!row) return { scope, id, ...this.defaults(scope), source: 'default', updatedAt: undefined, updatedBy: undefined };
    return { scope, id, ...toLimit(row), source: 'override', updatedAt: new Date(row.updated_at).toISOString(), updatedBy: row.updated_by };
  }

  async put(scope: LimitScope, id: string, limit: Limit, actor: string): Promise<LimitView> {
    await this.mustExist(scope, id);
    await this.change(
      `INSERT INTO rate_limit_overrides (scope, subject_id, requests_per_minute, tokens_per_minute, updated_by)
       VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (scope, subject_id) DO UPDATE SET requests_per_minute = EXCLUDED.requests_per_minute,
         tokens_per_minute = EXCLUDED.tokens_per_minute, updated_at = clock_timestamp(), updated_by = EXCLUDED.updated_by`,
      [scope, id, limit.requestsPerMinute, limit.tokensPerMinute ?? null, actor],
    );
    this.snapshot.set(`${scope}:${id}`, limit);
    return this.view(scope, id);
  }

  async remove(scope: LimitScope, id: string): Promise<LimitView> {
    await this.mustExist(scope, id);
    await this.change('DELETE FROM rate_limit_overrides WHERE scope = $1 AND subject_id = $2', [scope, id]);
    this.snapshot.delete(`${scope}:${id}`);
    return this.view(scope, id);
  }

  /**
   * One change, made while no other change is in progress on any instance (a transaction-scoped
   * advisory lock), so changes take their `updated_at` in the order they commit. The poll's stamp
   * (readStamp) relies on that: a change that took its time before another but committed after it,
   * with a poll between the two commits, left the stamp as that poll saw it, and the change unseen
   * by the other instances until some later one (test/e2e/rate-limit-overrides-commit-order).
   */
  private async change(statement: string, parameters: unknown[]): Promise<void> {
    await this.dataSource.transaction(async (manager) => {
      await manager.query('SELECT pg_advisory_xact_lock($1)', [OVERRIDES_CHANGE_LOCK]);
      await manager.query(statement, parameters);
    });
  }

  private async mustExist(scope: LimitScope, id: string): Promise<void> {
    const rows = await this.dataSource.query<unknown[]>(`SELECT 1 FROM ${SUBJECT_TABLE[scope]} WHERE id = $1`, [id]);
    if (rows.length === 0) throw new GatewayError('not_found', `No ${scope === 'key' ? 'API key' : scope} with id '${id}'.`);
  }

  private async pollOnce(): Promise<void> {
    try {
      const stamp = await this.readStamp();
      if (stamp !== this.stamp) await this.reload(stamp);
    } catch (error) {
      // Keep enforcing the limits we have; a database blip must not lift them.
      this.logger.warn({ err: (error as Error).message }, 'rate-limit override refresh failed; keeping current limits');
    }
  }

  /**
   * What changes whenever the table does: its row count and its latest change, to the
   * microsecond the database keeps (changes are serialised, so their times follow their commits). A Date holds milliseconds only, so two PUTs within one
   * millisecond on either side of a poll left the stamp as it was, and the second one unseen
   * until some later change (test/integration/rate-limit-overrides-stamp.int-spec.ts).
   */
  private async readStamp(): Promise<string> {
    const [row] = await this.dataSource.query<Array<{ stamp: string }>>(
      `SELECT count(*)::int || '|' || coalesce((extract(epoch FROM max(updated_at)) * 1000000)::bigint::text, '') AS stamp FROM rate_limit_overrides`,
    );
    return row?.stamp ?? '';
  }

  /**
   * `stamp` was read before the rows: a change between the two reads makes the next poll's stamp
   * differ again, so it is read once more rather than missed.
   */
  private async reload(stamp: string): Promise<void> {
    const rows = await this.dataSource.query<OverrideRow[]>('SELECT * FROM rate_limit_overrides');
    const next = new Map<string, Limit>();
    for (const row of rows) next.set(`${row.scope}:${row.subject_id}`, toLimit(row));
    this.snapshot = next;
    this.stamp = stamp;
  }
}

function toLimit(row: OverrideRow): Limit {
  return { requestsPerMinute: Number(row.requests_per_minute), tokensPerMinute: row.tokens_per_minute === null ? undefined : Number(row.tokens_per_minute) };
}
