import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import { DataSource } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { type ResolvedRoute, type RoutingTable, type RoutingTableBody, SEED_ROUTING_TABLE } from './routing-table.js';

interface VersionRow {
  version: number;
  body: RoutingTableBody;
  created_at: Date;
  created_by: string;
  comment: string | null;
}

export interface RouteRequest {
  taskType?: string;
  /** `auto`/undefined = let the table decide. */
  model?: string;
  /** OpenRouter-style explicit fallback list. */
  models?: string[];
  maxTokens?: number;
}

/**
 * Holds the current routing table in memory (no database read per request) and notices a new
 * version within `routing.refreshMs` by polling one indexed `max(version)`: cheap, and it works
 * the same on PGlite and PostgreSQL with no extra connection held open for LISTEN.
 */
@Injectable()
export class RoutingService implements OnModuleInit, OnApplicationShutdown {
  private current!: RoutingTable;
  private timer: NodeJS.Timeout | undefined;
  private refreshing: Promise<void> | undefined;

  constructor(
    private readonly dataSource: DataSource,
    private readonly config: AppConfig,
    private readonly appLogger: AppLogger,
  ) {}

  async onModuleInit(): Promise<void> {
    await this.dataSource.query(
      `INSERT INTO routing_versions (version, body, created_by, comment) VALUES (1, $1, 'system', 'seed: reference table') ON CONFLICT DO NOTHING`,
      [JSON.stringify(SEED_ROUTING_TABLE)],
    );
    await this.reload();
    this.timer = setInterval(() => void this.refresh(), this.config.routing.refreshMs);
    this.timer.unref();
  }

  onApplicationShutdown(): void {
    if (this.timer) clearInterval(this.timer);
  }

  table(): RoutingTable {
    return this.current;
  }

  /** Checks for a newer version now; safe to call concurrently (one query in flight). */
  refresh(): Promise<void> {
    this.refreshing ??= this.pollOnce().finally(() => {
      this.refreshing = undefined;
    });
    return this.refreshing;
  }

  private async pollOnce(): Promise<void> {
    try {
      const [row] = await this.dataSource.query<Array<{ version: number | null }>>('SELECT max(version) AS version FROM routing_versions');
      if (row?.version != null && Number(row.version) !== this.current.version) await this.reload();
    } catch (error) {
      // Keep serving the table we have; the database being briefly away must not stop routing.
      this.appLogger.logger.warn({ context: 'Routing', err: (error as Error).message }, 'routing refresh failed; keeping current table');
    }
  }

  private async reload(): Promise<void> {
    const [row] = await this.dataSource.query<VersionRow[]>(
      'SELECT version, body, created_at, created_by, comment FROM routing_versions ORDER BY version DESC LIMIT 1',
    );
    if (!row) throw new Error('routing_versions is empty after seeding');
    this.current = toTable(row);
  }

  async versions(): Promise<RoutingTable[]> {
    const rows = await this.dataSource.query<VersionRow[]>('SELECT version, body, created_at, created_by, comment FROM routing_versions ORDER BY version DESC');
    return rows.map(toTable);
  }

  /** Pure decision from a snapshot: the same function serves requests and the dry-run endpoint. */
  resolve(request: RouteRequest, table: RoutingTable = this.current): ResolvedRoute {
    const requestedTaskType = request.taskType ?? table.default_task_type;
    const rule = table.rules.find((r) => r.task_type === requestedTaskType) ?? table.rules.find((r) => r.task_type === table.default_task_type);
    if (!rule) throw new GatewayError('internal_error', 'The routing table has no default rule.');
    const explicitModel = request.model !== undefined && request.model !== 'auto';
    if (explicitModel && table.allowed_models && !table.allowed_models.includes(request.model as string)) {
      throw new GatewayError('model_not_allowed', `Model '${request.model}' is not allowed here; use 'auto' or one of: ${table.allowed_models.join(', ')}.`, { param: 'model' });
    }
    const primary = explicitModel ? (request.model as string) : rule.model;
    const fallbacks = request.models ?? rule.fallbacks;
    const models = [...new Set([primary, ...fallbacks])];
    const cap = rule.max_tokens ?? this.config.routing.defaultMaxTokens;
    const maxTokens = request.maxTokens === undefined ? cap : Math.min(request.maxTokens, cap);
    return { requestedTaskType, ruleTaskType: rule.task_type, version: table.version, models, maxTokens, explicitModel };
  }
}

function toTable(row: VersionRow): RoutingTable {
  return {
    version: Number(row.version),
    ...row.body,
    updated_at: new Date(row.created_at).toISOString(),
    updated_by: row.created_by,
    comment: row.comment,
  };
}
