import { Body, Controller, Get, HttpCode, type OnModuleInit, Param, Post, Put, Query } from '@nestjs/common';
import { HttpAdapterHost } from '@nestjs/core';
import { ApiBody, ApiCreatedResponse, ApiOkResponse, ApiOperation, ApiQuery, ApiTags } from '@nestjs/swagger';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { GatewayError } from '../../core/errors.js';
import { KnownQuery } from '../../core/known-query.js';
import { pathUuid } from '../../core/validate.js';
import { AdminOnly, CurrentPrincipal } from '../../identity/auth.guard.js';
import { IdentityService } from '../../identity/identity.service.js';
import type { Principal } from '../../identity/principal.js';
import { RoutingVersionsRepository } from '../routing-versions.repository.js';
import { RoutingService, staleVersion } from '../routing.service.js';
import {
  DepartmentOverridesDto,
  MAX_VERSION,
  ResolvedRouteDto,
  ResolveRequestDto,
  resolvedView,
  RollbackDto,
  RoutingTableDto,
  RoutingVersionListDto,
  UpdateRoutingTableDto,
} from './routing-admin.dto.js';

// The one route whose body is optional: `content-type: application/json` with no body means {}.
const ROLLBACK_ROUTE = '/admin/routing/rollback/:version';

function pathVersion(raw: string): number {
  const n = Number(raw);
  if (!/^\d{1,9}$/.test(raw) || n < 1) throw new GatewayError('not_found', `No routing table version '${raw.slice(0, 32)}'.`);
  return n;
}

@ApiTags('admin: routing')
@AdminOnly()
@Controller('admin/routing')
export class RoutingAdminController implements OnModuleInit {
  constructor(
    private readonly routing: RoutingService,
    private readonly history: RoutingVersionsRepository,
    private readonly identity: IdentityService,
    private readonly adapterHost: HttpAdapterHost,
  ) {}

  /**
   * Fastify's JSON parser refuses an empty body ("Body cannot be empty") before any handler runs,
   * but a rollback's body is optional and clients send `content-type: application/json` on every
   * POST. For that route alone, a declared-empty body loses its content type, so Fastify reads it
   * as no body at all (RollbackDto takes that as {}).
   */
  onModuleInit(): void {
    const adapter = this.adapterHost.httpAdapter as HttpAdapterHost['httpAdapter'] | undefined;
    const fastify = adapter?.getInstance<FastifyInstance>();
    if (typeof fastify?.addHook !== 'function') return;
    fastify.addHook('onRequest', (request: FastifyRequest, _reply: FastifyReply, done: () => void) => {
      const headers = request.headers;
      if (
        request.method === 'POST' &&
        headers['content-length'] === '0' &&
        headers['transfer-encoding'] === undefined &&
        headers['content-type'] !== undefined &&
        request.routeOptions.url === ROLLBACK_ROUTE
      ) {
        delete headers['content-type'];
      }
      done();
    });
  }

  /**
   * A change based on a version past MAX_VERSION is stale like any other unknown one (checked
   * here: SQL would refuse the number itself), with the same 409 the service gives.
   */
  private async assertNotPastMax(basedOn: number | undefined): Promise<void> {
    if (basedOn === undefined || basedOn < MAX_VERSION) return;
    throw staleVersion(basedOn, await this.history.latestVersion());
  }

  @Get()
  @ApiOperation({ summary: 'The routing table this instance serves, with its version (checks for a newer one first)' })
  @ApiOkResponse({ type: RoutingTableDto })
  async current() {
    await this.routing.refresh();
    return this.routing.table();
  }

  @Put()
  @ApiOperation({ summary: 'Replace the whole table as a new version; 409 conflict when `version` is not the latest; 400 lists every problem' })
  @ApiBody({ type: UpdateRoutingTableDto })
  @ApiOkResponse({ type: RoutingTableDto })
  async update(@CurrentPrincipal() admin: Principal, @Body() body: unknown) {
    const { basedOn, comment, body: table } = UpdateRoutingTableDto.parse(body);
    await this.assertNotPastMax(basedOn);
    return this.routing.update(table, { basedOn, comment, author: admin.userId });
  }

  @Get('versions')
  @KnownQuery('limit', 'before')
  @ApiOperation({ summary: 'Versions, newest first, with author and comment' })
  @ApiQuery({ name: 'limit', required: false, description: '1-500, default 50' })
  @ApiQuery({ name: 'before', required: false, description: 'only versions older than this one (paging)' })
  @ApiOkResponse({ type: RoutingVersionListDto })
  async versions(@Query('limit') limit?: string, @Query('before') before?: string) {
    const n = limit === undefined || limit === '' ? 50 : Number(limit);
    if (!Number.isInteger(n) || n < 1 || n > 500) throw new GatewayError('invalid_value', "'limit' must be an integer from 1 to 500.", { param: 'limit' });
    const b = before === undefined || before === '' ? undefined : Number(before);
    if (b !== undefined && (typeof before !== 'string' || !/^\d+$/.test(before) || b < 1 || b > MAX_VERSION)) {
      throw new GatewayError('invalid_value', `'before' must be a version number from 1 to ${MAX_VERSION}.`, { param: 'before' });
    }
    return { object: 'list', data: await this.routing.listVersions(n, b) };
  }

  @Get('versions/:version')
  @ApiOperation({ summary: 'One version of the table' })
  @ApiOkResponse({ type: RoutingTableDto })
  version(@Param('version') version: string) {
    return this.routing.getVersion(pathVersion(version));
  }

  @Post('rollback/:version')
  @ApiOperation({ summary: 'Restore an earlier version as a new version (history is never rewritten)' })
  @ApiBody({ type: RollbackDto, required: false })
  // A rollback writes a new version, so it keeps the POST default of 201; the document must say 201, not 200.
  @ApiCreatedResponse({ type: RoutingTableDto })
  async rollback(@CurrentPrincipal() admin: Principal, @Param('version') version: string, @Body() body: unknown) {
    const target = pathVersion(version);
    const { basedOn, comment } = RollbackDto.parse(body);
    if (basedOn !== undefined && basedOn >= MAX_VERSION) {
      await this.routing.getVersion(target); // an unknown target is still the 404 it would be
      await this.assertNotPastMax(basedOn);
    }
    return this.routing.rollback(target, { basedOn, comment, author: admin.userId });
  }

  @Post('resolve')
  @HttpCode(200)
  @ApiOperation({ summary: 'Dry run: the model, fallbacks, caps and cache policy a request would get, from the very resolver requests use; calls no model' })
  @ApiBody({ type: ResolveRequestDto })
  @ApiOkResponse({ type: ResolvedRouteDto })
  async resolve(@Body() body: unknown) {
    const { version, ...request } = ResolveRequestDto.parse(body);
    if (version !== undefined && version > MAX_VERSION) throw new GatewayError('not_found', `No routing table version ${version}.`);
    const { route } = await this.routing.dryRun(request, version);
    return resolvedView(route);
  }

  @Get('departments/:id')
  @ApiOperation({ summary: "A department's overrides in the current table" })
  async departmentOverrides(@Param('id') id: string) {
    const departmentId = pathUuid(id, 'department');
    await this.identity.getDepartment(departmentId); // 404 for an unknown one, as on PUT
    // The version is what a client sends back on its PUT: a stale one (another instance changed
    // the table a moment ago) would only earn it a 409, so read the newest, as GET /admin/routing does.
    await this.routing.refresh();
    const table = this.routing.table();
    return { department_id: departmentId, version: table.version, overrides: this.routing.departmentOverrides(departmentId) };
  }

  @Put('departments/:id')
  @ApiOperation({ summary: "Replace one department's overrides (of rules with department_overridable) as a new table version; 409 when stale" })
  @ApiBody({ type: DepartmentOverridesDto })
  @ApiOkResponse({ type: RoutingTableDto })
  async setDepartmentOverrides(@CurrentPrincipal() admin: Principal, @Param('id') id: string, @Body() body: unknown) {
    const departmentId = pathUuid(id, 'department');
    const { basedOn, comment, overrides } = DepartmentOverridesDto.parse(body);
    if (basedOn >= MAX_VERSION) {
      await this.identity.getDepartment(departmentId); // an unknown department is still the 404 it would be
      await this.assertNotPastMax(basedOn);
    }
    return this.routing.setDepartmentOverrides(departmentId, overrides, { basedOn, comment, author: admin.userId });
  }
}
