import { Body, Controller, Delete, Get, HttpCode, Param, Put } from '@nestjs/common';
import { ApiBody, ApiOkResponse, ApiOperation, ApiParam, ApiTags } from '@nestjs/swagger';
import { pathUuid } from '../../core/validate.js';
import { AdminOnly, CurrentPrincipal } from '../../identity/auth.guard.js';
import type { Principal } from '../../identity/principal.js';
import { RateLimitOverrides } from '../rate-limit-overrides.service.js';
import { parseScope, PutRateLimitDto, rateLimitView, RateLimitViewDto } from './rate-limit-admin.dto.js';

@ApiTags('admin: rate limits')
@AdminOnly()
@Controller('admin/rate-limits')
export class RateLimitAdminController {
  constructor(private readonly overrides: RateLimitOverrides) {}

  @Get(':scope/:id')
  @ApiOperation({ summary: 'The limit in force for a key, user or department (override or configured default)' })
  @ApiParam({ name: 'scope', enum: ['keys', 'users', 'departments'] })
  @ApiOkResponse({ type: RateLimitViewDto })
  async get(@Param('scope') scope: string, @Param('id') id: string): Promise<RateLimitViewDto> {
    const s = parseScope(scope);
    return rateLimitView(await this.overrides.view(s, pathUuid(id, s)));
  }

  @Put(':scope/:id')
  @ApiOperation({ summary: 'Override the limit of a key, user or department' })
  @ApiParam({ name: 'scope', enum: ['keys', 'users', 'departments'] })
  @ApiBody({ type: PutRateLimitDto })
  @ApiOkResponse({ type: RateLimitViewDto })
  async put(
    @Param('scope') scope: string,
    @Param('id') id: string,
    @Body() body: unknown,
    @CurrentPrincipal() principal: Principal,
  ): Promise<RateLimitViewDto> {
    const s = parseScope(scope);
    const subject = pathUuid(id, s);
    return rateLimitView(await this.overrides.put(s, subject, PutRateLimitDto.parse(body), `user:${principal.userId}`));
  }

  @Delete(':scope/:id')
  @HttpCode(200)
  @ApiOperation({ summary: 'Remove an override: the configured default applies again' })
  @ApiParam({ name: 'scope', enum: ['keys', 'users', 'departments'] })
  @ApiOkResponse({ type: RateLimitViewDto })
  async remove(@Param('scope') scope: string, @Param('id') id: string): Promise<RateLimitViewDto> {
    const s = parseScope(scope);
    return rateLimitView(await this.overrides.remove(s, pathUuid(id, s)));
  }
}
