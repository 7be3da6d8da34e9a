import { Controller, Get } from '@nestjs/common';
import { ApiTags } from '@nestjs/swagger';
import { AdminOnly } from '../../identity/auth.guard.js';
import { RoutingService } from '../routing.service.js';

@ApiTags('admin: routing')
@AdminOnly()
@Controller('admin/routing')
export class RoutingAdminController {
  constructor(private readonly routing: RoutingService) {}

  @Get()
  current() {
    return this.routing.table();
  }

  @Get('versions')
  async versions() {
    return { object: 'list', data: await this.routing.versions() };
  }
}
