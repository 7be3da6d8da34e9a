import { Injectable, type OnApplicationShutdown, type OnModuleInit } from '@nestjs/common';
import { AppConfig } from '../config/config.js';
import { GatewayError } from '../core/errors.js';
import { AppLogger } from '../core/logger.js';
import { IdentityService } from '../identity/identity.service.js';
import { type CompiledTable, compileTable, resolveRoute, type RouteRequest } from './routing-resolver.js';
import { type DepartmentOverride, type ResolvedRoute, type RoutingTable, type RoutingTableBody, SEED_ROUTING_TABLE } from './routing-table.js';
import { implicitCapProblems, invalidTable as invalid, parseOverrides, type RoutingProblem } from './routing-validation.js';
import { RoutingVersionsRepository } from './routing-versions.repository.js';

export type { RouteRequest } from './routing-resolver.js';

export interface TableChange {
  basedOn: number;
  author: string;
  comment: string | null;
}

/**
 * Holds the current routing table in memory, compiled for lookups (no database read per
 * request), and notices a version written by any instance within `routing.refreshMs` by polling
 * one index-only `max(version)`: cheap, the same on PGlite and PostgreSQL, and it needs no
 * connection held open for LISTEN. A request resolves once and keeps its `ResolvedRoute`, so a
 * change never reaches a request already in flight.
 */
@Injectable()
export class RoutingService implements OnModuleInit, OnApplicationShutdown {
  private current!: CompiledTable;
  private timer: NodeJS.Timeout | undefined;
  /** The poll running now, and the one callers who asked during it wait for (refresh). */
  private polling: Promise<void> | undefined;
  private nextPoll: Promise<void> | undefined;

  constructor(
    private readonly versions: RoutingVersionsRepository,
    private readonly identity: IdentityService,
    private readonly config: AppConfig,
    private readonly appLogger: AppLogger,
  ) {}

  async onModuleInit(): Promise<void> {
    await this.versions.seed(SEED_ROUTING_TABLE);
    const latest = await this.versions.latest();
    if (!latest) throw new Error('routing_versions is empty after seeding');
    this.install(latest);
    // The timer needs no fresher poll than one already running.
    this.timer = setInterval(() => {
      if (this.polling === undefined) void this.startPoll();
    }, this.config.routing.refreshMs);
    this.timer.unref();
  }

  onApplicationShutdown(): void {
    if (this.timer) clearInterval(this.timer);
  }

  table(): RoutingTable {
    return this.current.table;
  }

  /**
   * Checks for a newer version with a poll that starts after this call: a reader that must see
   * every change committed before it asked (the admin GETs, whose version the next PUT sends) must
   * not be handed a poll already in flight, whose `max(version)` may predate that change (another
   * instance's PUT answered meanwhile). Callers that arrive while a poll runs share the one poll
   * that follows it, so at most two queries are ever in flight or waiting.
   */
  refresh(): Promise<void> {
    if (this.polling === undefined) return this.startPoll();
    this.nextPoll ??= this.polling.then(() => {
      this.nextPoll = undefined;
      return this.startPoll();
    });
    return this.nextPoll;
  }

  private startPoll(): Promise<void> {
    const poll = this.pollOnce().finally(() => {
      if (this.polling === poll) this.polling = undefined;
    });
    this.polling = poll;
    return poll;
  }

  private async pollOnce(): Promise<void> {
    try {
      const version = await this.versions.latestVersion();
      if (version !== null && version > this.current.table.version) {
        const latest = await this.versions.latest();
        if (latest) this.install(latest);
      }
    } catch (error) {
      // Keep serving the table we have; the database being briefly away must not stop routing.
      this.appLogger.logger.warn({ context: 'Routing', err: (error as Error).message }, 'routing refresh failed; keeping current table');
    }
  }

  /** Versions only grow, so an older snapshot (a slow poll racing a local write) never wins. */
  private install(table: RoutingTable): void {
    if (this.current && table.version <= this.current.table.version) return;
    this.current = compileTable(table, this.config.routing.defaultMaxTokens);
    this.appLogger.logger.info({ context: 'Routing', version: table.version, by: table.updated_by }, 'routing table installed');
  }

  /** The decision for one request, from the in-memory snapshot. */
  resolve(request: RouteRequest, compiled: CompiledTable = this.current): ResolvedRoute {
    return resolveRoute(compiled, request);
  }

  /** Dry run (`POST /admin/routing/resolve`): the same `resolve`, on the snapshot requests use now. */
  async dryRun(request: RouteRequest & { userId?: string }, version?: number): Promise<{ route: ResolvedRoute; table: RoutingTable }> {
    let departmentId = request.departmentId;
    if (request.userId !== undefined) {
      const user = await this.identity.getUser(request.userId);
      if (departmentId !== undefined && departmentId !== user.departmentId) {
        throw new GatewayError('invalid_value', `User ${user.id} belongs to department ${user.departmentId}, not ${departmentId}.`, { param: 'department_id' });
      }
      departmentId = user.departmentId;
    } else if (departmentId !== undefined) {
      // 404 for a department that does not exist, as everywhere else: a dry run must not answer a typo
      // as if that department simply had no override.
      await this.identity.getDepartment(departmentId);
    }
    let compiled = this.current;
    if (version !== undefined && version !== compiled.table.version) {
      const table = await this.versions.get(version);
      if (!table) throw new GatewayError('not_found', `No routing table version ${version}.`);
      compiled = compileTable(table, this.config.routing.defaultMaxTokens);
    }
    return { route: this.resolve({ ...request, departmentId }, compiled), table: compiled.table };
  }

  async listVersions(limit: number, before?: number): Promise<RoutingTable[]> {
    return this.versions.list(limit, before);
  }

  async getVersion(version: number): Promise<RoutingTable> {
    const table = await this.versions.get(version);
    if (!table) throw new GatewayError('not_found', `No routing table version ${version}.`);
    return table;
  }

  /** `PUT /admin/routing`: a whole new table (already validated at the edge), 409 when stale. */
  async update(body: RoutingTableBody, change: TableChange): Promise<RoutingTable> {
    await this.checkForToday(body);
    return this.append(body, change);
  }

  /**
   * What a stored table must also pass under this instance's config and data, beyond its own
   * validation: no default above DEFAULT_MAX_TOKENS where no cap applies, overrides of departments
   * that exist. A table is checked so whenever it is written, a rollback's too: one valid when it
   * was first written (under a higher DEFAULT_MAX_TOKENS) would be stored and quietly lowered.
   */
  private async checkForToday(body: RoutingTableBody): Promise<void> {
    const capped = implicitCapProblems(body, this.config.routing.defaultMaxTokens);
    if (capped.length > 0) throw invalid(capped);
    await this.checkDepartments(body.department_overrides ?? [], 'department_overrides');
  }

  /** `PUT /admin/routing/departments/{id}`: replaces one department's overrides, as a new version. */
  async setDepartmentOverrides(departmentId: string, raw: unknown, change: TableChange): Promise<RoutingTable> {
    await this.identity.getDepartment(departmentId);
    const base = await this.versions.get(change.basedOn);
    const latest = await this.versions.latestVersion();
    if (!base || latest !== change.basedOn) throw staleVersion(change.basedOn, latest);
    const withDepartment = Array.isArray(raw) ? raw.map((o: unknown) => withDepartmentId(o, departmentId)) : raw;
    const { overrides, problems } = parseOverrides(withDepartment, base.rules, 'overrides');
    for (const [i, o] of overrides.entries()) {
      if (o.department_id !== departmentId) problems.push({ param: `overrides[${i}].department_id`, message: 'must be the department in the path' });
    }
    for (const p of implicitCapProblems({ ...bodyOf(base), department_overrides: overrides }, this.config.routing.defaultMaxTokens)) {
      if (p.param.startsWith('department_overrides')) problems.push({ ...p, param: p.param.replace('department_overrides', 'overrides') });
    }
    if (problems.length > 0) throw invalid(problems);
    const others = (base.department_overrides ?? []).filter((o) => o.department_id !== departmentId);
    return this.append({ ...bodyOf(base), department_overrides: [...others, ...overrides] }, change);
  }

  departmentOverrides(departmentId: string): DepartmentOverride[] {
    return (this.current.table.department_overrides ?? []).filter((o) => o.department_id === departmentId);
  }

  /**
   * `POST /admin/routing/rollback/{version}`: the old table becomes a new version, so history is
   * never rewritten. Without `basedOn` it applies on top of whatever is latest.
   */
  async rollback(target: number, change: Omit<TableChange, 'basedOn'> & { basedOn?: number }): Promise<RoutingTable> {
    const old = await this.versions.get(target);
    if (!old) throw new GatewayError('not_found', `No routing table version ${target}.`);
    await this.checkForToday(bodyOf(old));
    const comment = change.comment ?? `rollback to version ${target}`;
    if (change.basedOn !== undefined) return this.append(bodyOf(old), { ...change, basedOn: change.basedOn, comment }, target);
    // Racing another writer is fine here (the caller asked for "this table now"), so retry on a lost race.
    for (let tries = 0; tries < 5; tries++) {
      const latest = await this.versions.latestVersion();
      const written = await this.versions.append({ basedOn: latest ?? 0, body: bodyOf(old), author: change.author, comment, restoredFrom: target });
      if (written) {
        this.install(written);
        return written;
      }
    }
    throw new GatewayError('conflict', 'The routing table kept changing during the rollback; try again.');
  }

  private async append(body: RoutingTableBody, change: TableChange, restoredFrom?: number): Promise<RoutingTable> {
    const written = await this.versions.append({ basedOn: change.basedOn, body, author: change.author, comment: change.comment, restoredFrom });
    if (!written) throw staleVersion(change.basedOn, await this.versions.latestVersion());
    // This instance serves the new table at once; the others pick it up on their next poll.
    this.install(written);
    return written;
  }

  /** Overrides must name departments that exist (checked here: validation itself is pure). */
  private async checkDepartments(overrides: DepartmentOverride[], at: string): Promise<void> {
    const problems: RoutingProblem[] = [];
    const checked = new Map<string, boolean>();
    for (const [i, o] of overrides.entries()) {
      let exists = checked.get(o.department_id);
      if (exists === undefined) {
        exists = await this.identity.getDepartment(o.department_id).then(
          () => true,
          (error: unknown) => {
            if (error instanceof GatewayError && error.code === 'not_found') return false;
            throw error;
          },
        );
        checked.set(o.department_id, exists);
      }
      if (!exists) problems.push({ param: `${at}[${i}].department_id`, message: `no department with id '${o.department_id}'` });
    }
    if (problems.length > 0) throw invalid(problems);
  }
}

function bodyOf(table: RoutingTable): RoutingTableBody {
  const body: RoutingTableBody = { default_task_type: table.default_task_type, rules: table.rules, allowed_models: table.allowed_models ?? null };
  if (table.department_overrides && table.department_overrides.length > 0) body.department_overrides = table.department_overrides;
  return body;
}

function withDepartmentId(o: unknown, departmentId: string): unknown {
  if (typeof o !== 'object' || o === null || Array.isArray(o) || 'department_id' in o) return o;
  return { department_id: departmentId, ...o };
}

/** The 409 of a change based on a version that is not the latest (also the admin edge's, for versions past MAX_VERSION). */
export function staleVersion(basedOn: number, latest: number | null): GatewayError {
  return new GatewayError(
    'conflict',
    `The routing table changed since version ${basedOn} (the latest is ${latest ?? 'unknown'}): reload it, reapply your change and send the new version.`,
    { param: 'version', details: { current_version: latest } },
  );
}
