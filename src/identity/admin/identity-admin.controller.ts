import { Body, Controller, Delete, Get, HttpCode, Param, Patch, Post, Query } from '@nestjs/common';
import { ApiBody, ApiQuery, ApiTags } from '@nestjs/swagger';
import { KnownQuery } from '../../core/known-query.js';
import { pathUuid, queryUuid } from '../../core/validate.js';
import { AdminOnly } from '../auth.guard.js';
import { IdentityService } from '../identity.service.js';
import { CreateDepartmentDto, CreateKeyDto, CreateUserDto, departmentView, keyView, UpdateDepartmentDto, userView } from './identity-admin.dto.js';

@ApiTags('admin: identity')
@AdminOnly()
@Controller('admin')
export class IdentityAdminController {
  constructor(private readonly identity: IdentityService) {}

  @Post('departments')
  @ApiBody({ type: CreateDepartmentDto })
  async createDepartment(@Body() body: unknown) {
    return departmentView(await this.identity.createDepartment(CreateDepartmentDto.parse(body).name));
  }

  @Get('departments')
  async listDepartments() {
    return { object: 'list', data: (await this.identity.listDepartments()).map(departmentView) };
  }

  @Get('departments/:id')
  async getDepartment(@Param('id') id: string) {
    return departmentView(await this.identity.getDepartment(pathUuid(id, 'department')));
  }

  @Patch('departments/:id')
  @ApiBody({ type: UpdateDepartmentDto })
  async updateDepartment(@Param('id') id: string, @Body() body: unknown) {
    const dto = UpdateDepartmentDto.parse(body);
    return departmentView(await this.identity.updateDepartment(pathUuid(id, 'department'), { name: dto.name, cacheScope: dto.cache_scope }));
  }

  @Delete('departments/:id')
  async disableDepartment(@Param('id') id: string) {
    return departmentView(await this.identity.disableDepartment(pathUuid(id, 'department')));
  }

  @Post('users')
  @ApiBody({ type: CreateUserDto })
  async createUser(@Body() body: unknown) {
    const dto = CreateUserDto.parse(body);
    return userView(await this.identity.createUser({ name: dto.name, departmentId: dto.department_id, role: dto.role }));
  }

  @Get('users')
  @KnownQuery('department_id')
  // Without it Swagger marks the @Query filter required, and a generated client could never list everyone.
  @ApiQuery({ name: 'department_id', required: false, format: 'uuid', description: 'only the users of this department' })
  async listUsers(@Query('department_id') departmentId?: string) {
    const filter = queryUuid(departmentId, 'department_id');
    return { object: 'list', data: (await this.identity.listUsers(filter)).map(userView) };
  }

  @Get('users/:id')
  async getUser(@Param('id') id: string) {
    return userView(await this.identity.getUser(pathUuid(id, 'user')));
  }

  @Delete('users/:id')
  async disableUser(@Param('id') id: string) {
    return userView(await this.identity.disableUser(pathUuid(id, 'user')));
  }

  @Post('keys')
  @ApiBody({ type: CreateKeyDto })
  async createKey(@Body() body: unknown) {
    const { entity, key } = await this.identity.createKey(CreateKeyDto.parse(body));
    return { ...keyView(entity), key };
  }

  @Get('keys')
  @KnownQuery('user_id')
  @ApiQuery({ name: 'user_id', required: false, format: 'uuid', description: 'only the keys of this user' })
  async listKeys(@Query('user_id') userId?: string) {
    const filter = queryUuid(userId, 'user_id');
    return { object: 'list', data: (await this.identity.listKeys(filter)).map(keyView) };
  }

  @Delete('keys/:id')
  @HttpCode(200)
  async revokeKey(@Param('id') id: string) {
    return keyView(await this.identity.revokeKey(pathUuid(id, 'key')));
  }
}
