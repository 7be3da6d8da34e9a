import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from 'typeorm';

export type UserRole = 'user' | 'admin';
export type CacheScope = 'user' | 'department';

@Entity('departments')
export class DepartmentEntity {
  @PrimaryGeneratedColumn('uuid') id!: string;
  @Column('text') name!: string;
  /** 'department' lets users of one department share cached answers; default is per user. */
  @Column({ type: 'text', name: 'cache_scope', default: 'user' }) cacheScope!: CacheScope;
  @CreateDateColumn({ type: 'timestamptz', name: 'created_at' }) createdAt!: Date;
  @Column({ type: 'timestamptz', name: 'disabled_at', nullable: true }) disabledAt!: Date | null;
}

@Entity('users')
export class UserEntity {
  @PrimaryGeneratedColumn('uuid') id!: string;
  @Column('text') name!: string;
  @Column({ type: 'uuid', name: 'department_id' }) departmentId!: string;
  @Column('text') role!: UserRole;
  @CreateDateColumn({ type: 'timestamptz', name: 'created_at' }) createdAt!: Date;
  @Column({ type: 'timestamptz', name: 'disabled_at', nullable: true }) disabledAt!: Date | null;
}

@Entity('api_keys')
export class ApiKeyEntity {
  @PrimaryGeneratedColumn('uuid') id!: string;
  @Column({ type: 'uuid', name: 'user_id' }) userId!: string;
  @Column({ type: 'text', nullable: true }) name!: string | null;
  /** The first characters of the key, safe to show, so people can tell their keys apart. */
  @Column('text') prefix!: string;
  /** sha256 of the whole key; the key itself is never stored. */
  @Column({ type: 'text', name: 'key_hash' }) keyHash!: string;
  @CreateDateColumn({ type: 'timestamptz', name: 'created_at' }) createdAt!: Date;
  @Column({ type: 'timestamptz', name: 'expires_at', nullable: true }) expiresAt!: Date | null;
  @Column({ type: 'timestamptz', name: 'revoked_at', nullable: true }) revokedAt!: Date | null;
  /** Stored from ADMIN_API_KEY at a start, not made through the admin API: a rotation revokes such keys (IdentityService.ensureEnvKey). */
  @Column({ type: 'boolean', name: 'from_env', default: false }) fromEnv!: boolean;
}
