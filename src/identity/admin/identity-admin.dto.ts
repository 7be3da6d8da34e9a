import { ApiProperty, ApiPropertyOptional } from '@nestjs/swagger';
import { asBody, optionalDate, optionalEnum, optionalString, rejectUnknownFields, requiredEnum, requiredString, requiredUuid } from '../../core/validate.js';
import type { ApiKeyEntity, CacheScope, DepartmentEntity, UserEntity, UserRole } from '../identity.entities.js';

// Each DTO documents the wire shape for /docs and parses it, naming the field that is wrong.

export class CreateDepartmentDto {
  @ApiProperty({ example: 'Research' }) name!: string;
  static parse(raw: unknown): CreateDepartmentDto {
    const body = asBody(raw);
    rejectUnknownFields(body, ['name']);
    return { name: requiredString(body, 'name') };
  }
}

export class UpdateDepartmentDto {
  @ApiPropertyOptional({ example: 'Research' }) name?: string;
  @ApiPropertyOptional({ enum: ['user', 'department'], description: 'who may share cached answers' }) cache_scope?: CacheScope;
  static parse(raw: unknown): UpdateDepartmentDto {
    const body = asBody(raw);
    rejectUnknownFields(body, ['name', 'cache_scope']);
    return { name: optionalString(body, 'name'), cache_scope: optionalEnum(body, 'cache_scope', ['user', 'department'] as const) };
  }
}

export class CreateUserDto {
  @ApiProperty({ example: 'alice' }) name!: string;
  @ApiProperty({ format: 'uuid' }) department_id!: string;
  @ApiProperty({ enum: ['user', 'admin'] }) role!: UserRole;
  static parse(raw: unknown): CreateUserDto {
    const body = asBody(raw);
    rejectUnknownFields(body, ['name', 'department_id', 'role']);
    return {
      name: requiredString(body, 'name'),
      department_id: requiredUuid(body, 'department_id'),
      role: body.role === undefined ? 'user' : requiredEnum(body, 'role', ['user', 'admin'] as const),
    };
  }
}

export class CreateKeyDto {
  @ApiProperty({ format: 'uuid' }) user_id!: string;
  @ApiPropertyOptional({ example: 'ci pipeline' }) name?: string;
  @ApiPropertyOptional({ format: 'date-time' }) expires_at?: string;
  static parse(raw: unknown): { userId: string; name?: string; expiresAt?: Date } {
    const body = asBody(raw);
    rejectUnknownFields(body, ['user_id', 'name', 'expires_at']);
    return { userId: requiredUuid(body, 'user_id'), name: optionalString(body, 'name'), expiresAt: optionalDate(body, 'expires_at') };
  }
}

export const departmentView = (d: DepartmentEntity) => ({
  id: d.id,
  name: d.name,
  cache_scope: d.cacheScope,
  created_at: d.createdAt.toISOString(),
  disabled_at: d.disabledAt?.toISOString() ?? null,
});

export const userView = (u: UserEntity) => ({
  id: u.id,
  name: u.name,
  department_id: u.departmentId,
  role: u.role,
  created_at: u.createdAt.toISOString(),
  disabled_at: u.disabledAt?.toISOString() ?? null,
});

/** Never includes the hash, let alone the key. */
export const keyView = (k: ApiKeyEntity) => ({
  id: k.id,
  user_id: k.userId,
  name: k.name,
  prefix: k.prefix,
  created_at: k.createdAt.toISOString(),
  expires_at: k.expiresAt?.toISOString() ?? null,
  revoked_at: k.revokedAt?.toISOString() ?? null,
  // Stored from ADMIN_API_KEY: the keys a rotation of it revokes. Every other key (made through the
  // admin API, or generated at the first start) a rotation never touches.
  from_env: k.fromEnv,
});
