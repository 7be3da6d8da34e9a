import { Injectable } from '@nestjs/common';
import { DataSource, type EntityManager, type Repository } from 'typeorm';
import { AppConfig } from '../config/config.js';
import { Clock } from '../core/clock.js';
import { databaseStep } from '../core/deadline.js';
import { GatewayError } from '../core/errors.js';
import { generateApiKey, hashApiKey, keyPrefix } from './api-key.js';
import { ApiKeyEntity, type CacheScope, DepartmentEntity, UserEntity, type UserRole } from './identity.entities.js';
import type { Principal } from './principal.js';

interface CachedKey {
  principal: Principal | null;
  until: number;
}

const MAX_CACHED_KEYS = 50_000;

/** The name ADMIN_API_KEY's row gets; for people reading key listings, never to recognise it (`from_env` does). */
const ENV_KEY_NAME = 'bootstrap (ADMIN_API_KEY)';

/** What a start did with ADMIN_API_KEY. Prefixes only: the secret never leaves ensureEnvKey. */
export interface EnvKeyOutcome {
  keyId: string;
  prefix: string;
  /** `revoked`: an admin revoked this very key; `unusable`: its user or department is disabled. Either way it does not work. */
  state: 'usable' | 'revoked' | 'unusable';
  /** This call stored the key (one of several replicas storing the same new secret at once). */
  created: boolean;
  /** Earlier ADMIN_API_KEY keys this start revoked. */
  revoked: Array<{ keyId: string; prefix: string }>;
}

/**
 * Departments, users and keys, and the per-request key → principal lookup.
 *
 * The lookup is cached in memory for `auth.keyCacheMs` (≤ 2 s, the revocation promise in
 * API.md): one database round trip per key per second instead of one per request. Unknown keys
 * are cached too, so a client hammering with a bad key cannot hammer the database.
 */
/** The last-admin-key guard counts only admin keys still usable this long from now. */
const ADMIN_KEY_MUST_LAST_S = 24 * 3600;
/**
 * Transaction-scoped advisory lock taken by every change that can take away an admin key (revoke,
 * disable a user or department): the check that another admin key remains and the change are then
 * one step. Without it two admins revoking each other's keys at once both saw the other's key
 * still usable, both succeeded, and nobody could reach the admin API.
 */
const ADMIN_GUARD_LOCK = 7_263_001;

type Except = { keyId?: string; userId?: string; departmentId?: string };

@Injectable()
export class IdentityService {
  private readonly departments: Repository<DepartmentEntity>;
  private readonly users: Repository<UserEntity>;
  private readonly keys: Repository<ApiKeyEntity>;
  private readonly cache = new Map<string, CachedKey>();
  /** Keys that matched nothing (or a revoked, disabled one), kept as briefly as valid ones. */
  private readonly refused = new Map<string, CachedKey>();
  /** How many keys each of the two caches holds at most (a test sets a small bound). */
  readonly maxCachedKeys: number = MAX_CACHED_KEYS;
  /** Moved by forgetCachedKeys(): a key lookup that spans it read the database too early. */
  private cacheGeneration = 0;

  constructor(
    private readonly dataSource: DataSource,
    private readonly config: AppConfig,
    private readonly clock: Clock,
  ) {
    this.departments = dataSource.getRepository(DepartmentEntity);
    this.users = dataSource.getRepository(UserEntity);
    this.keys = dataSource.getRepository(ApiKeyEntity);
  }

  /** Resolves a presented key; throws 401 for unknown/revoked/expired, 503 when the database is down. */
  async authenticate(key: string): Promise<Principal> {
    const keyHash = hashApiKey(key);
    const now = this.clock.nowMs();
    let entry = this.cache.get(keyHash) ?? this.refused.get(keyHash);
    if (entry === undefined || entry.until <= now) {
      // A lookup that read the key before a revocation here committed, and comes back after
      // forgetCachedKeys() ran, must not put the revoked key back for a whole keyCacheMs: such a
      // lookup is made once more, and that answer is the request's, cached only if no other
      // change raced it too (admin churn must not loop a request).
      const generation = this.cacheGeneration;
      let principal = await this.lookup(keyHash);
      if (generation !== this.cacheGeneration) {
        const again = this.cacheGeneration;
        principal = await this.lookup(keyHash);
        if (again !== this.cacheGeneration) return this.admitted(principal, now);
      }
      entry = { principal, until: now + this.config.auth.keyCacheMs };
      // Valid and unknown keys are kept apart, each map making room by dropping its oldest entry
      // (a Map iterates in insertion order): a flood of distinct bad keys only pushes out bad
      // keys, where one cleared map also dropped every valid key's entry, and each of those
      // callers' next request went to the database.
      const into = entry.principal === null ? this.refused : this.cache;
      (entry.principal === null ? this.cache : this.refused).delete(keyHash);
      into.delete(keyHash);
      if (into.size >= this.maxCachedKeys) into.delete(into.keys().next().value as string);
      into.set(keyHash, entry);
    }
    return this.admitted(entry.principal, now);
  }

  private admitted(principal: Principal | null, now: number): Principal {
    if (principal === null) throw new GatewayError('invalid_api_key', 'Invalid API key provided.');
    if (principal.expiresAt !== undefined && principal.expiresAt <= now) throw new GatewayError('invalid_api_key', 'This API key has expired.');
    return principal;
  }

  private async lookup(keyHash: string): Promise<Principal | null> {
    let rows: Array<{ id: string; prefix: string; user_id: string; department_id: string; role: UserRole; cache_scope: CacheScope; expires_at: Date | null }>;
    try {
      rows = await databaseStep(
        this.dataSource.query(
          `SELECT k.id, k.prefix, k.user_id, u.department_id, u.role, d.cache_scope, k.expires_at
             FROM api_keys k JOIN users u ON u.id = k.user_id JOIN departments d ON d.id = u.department_id
            WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND d.disabled_at IS NULL`,
          [keyHash],
        ),
        this.config.databaseRequestTimeoutMs,
        (timedOut) => timedOut,
      );
    } catch (cause) {
      // Fail closed but honestly: the key may be fine, the database is not.
      throw new GatewayError('unavailable', 'The gateway cannot verify API keys right now (database unavailable).', { cause });
    }
    const row = rows[0];
    if (!row) return null;
    return {
      keyId: row.id,
      keyPrefix: row.prefix,
      userId: row.user_id,
      departmentId: row.department_id,
      role: row.role,
      cacheScope: row.cache_scope,
      expiresAt: row.expires_at ? new Date(row.expires_at).getTime() : undefined,
    };
  }

  /** Local revocations take effect at once; other instances drop their copy within keyCacheMs. */
  forgetCachedKeys(): void {
    this.cacheGeneration++;
    this.cache.clear();
    this.refused.clear();
  }

  // ---- departments ----

  async createDepartment(name: string): Promise<DepartmentEntity> {
    await this.assertDepartmentNameFree(name);
    return this.saveDepartment(this.departments.create({ name }));
  }

  listDepartments(): Promise<DepartmentEntity[]> {
    return this.departments.find({ order: { createdAt: 'ASC' } });
  }

  async getDepartment(id: string): Promise<DepartmentEntity> {
    const department = await this.departments.findOneBy({ id });
    if (!department) throw new GatewayError('not_found', `No department with id '${id}'.`);
    return department;
  }

  /**
   * Writes only the columns asked for. Saving the entity read at the start wrote back every
   * column it held, so a DELETE (disable) committed by another admin meanwhile was undone and the
   * department's keys worked again.
   */
  async updateDepartment(id: string, changes: { cacheScope?: CacheScope; name?: string }): Promise<DepartmentEntity> {
    await this.getDepartment(id);
    const set: Partial<Pick<DepartmentEntity, 'cacheScope' | 'name'>> = {};
    if (changes.cacheScope !== undefined) set.cacheScope = changes.cacheScope;
    if (changes.name !== undefined) {
      await this.assertDepartmentNameFree(changes.name, id);
      set.name = changes.name;
    }
    if (Object.keys(set).length > 0) {
      try {
        await this.departments.update({ id }, set);
      } catch (cause) {
        throw uniqueViolation(cause) ? departmentNameTaken(changes.name ?? '', cause) : cause;
      }
    }
    this.forgetCachedKeys();
    return this.getDepartment(id);
  }

  /** Names are unique regardless of case (a unique index on lower(name)): 409, not the index's 500. */
  private async assertDepartmentNameFree(name: string, exceptId?: string): Promise<void> {
    const query = this.departments.createQueryBuilder('d').where('lower(d.name) = lower(:name)', { name });
    if (exceptId !== undefined) query.andWhere('d.id <> :exceptId', { exceptId });
    if (await query.getOne()) throw departmentNameTaken(name);
  }

  /** Saves a new department; a name taken meanwhile by a concurrent request is the same 409. */
  private async saveDepartment(department: DepartmentEntity): Promise<DepartmentEntity> {
    try {
      return await this.departments.save(department);
    } catch (cause) {
      throw uniqueViolation(cause) ? departmentNameTaken(department.name, cause) : cause;
    }
  }

  async disableDepartment(id: string): Promise<DepartmentEntity> {
    const department = await this.getDepartment(id);
    if (department.disabledAt === null) {
      await this.whileAnAdminRemains({ departmentId: id }, (manager) =>
        manager.query(`UPDATE departments SET disabled_at = $2 WHERE id = $1 AND disabled_at IS NULL`, [id, this.clock.now()]),
      );
    }
    this.forgetCachedKeys();
    return this.getDepartment(id);
  }

  // ---- users ----

  /**
   * 409 when the department is disabled (a user there could never authenticate) or already has
   * an enabled user of this name, regardless of case (a unique index on (department_id,
   * lower(name)) of enabled users, migration UserNames1764400000200; a concurrent create of the
   * same name is the same 409).
   */
  async createUser(input: { name: string; departmentId: string; role: UserRole }): Promise<UserEntity> {
    const department = await this.departments.findOneBy({ id: input.departmentId });
    if (!department) throw new GatewayError('not_found', `No department with id '${input.departmentId}'.`, { param: 'department_id' });
    if (department.disabledAt !== null) {
      throw new GatewayError('conflict', `Department '${department.name}' is disabled: a user in it could never call the gateway.`, { param: 'department_id' });
    }
    const taken = await this.users
      .createQueryBuilder('u')
      .where('u.department_id = :departmentId AND lower(u.name) = lower(:name) AND u.disabled_at IS NULL', { departmentId: department.id, name: input.name })
      .getOne();
    if (taken) throw userNameTaken(input.name, department.name);
    try {
      return await this.users.save(this.users.create(input));
    } catch (cause) {
      throw uniqueViolation(cause) ? userNameTaken(input.name, department.name, cause) : cause;
    }
  }

  listUsers(departmentId?: string): Promise<UserEntity[]> {
    return this.users.find({ where: departmentId ? { departmentId } : {}, order: { createdAt: 'ASC' } });
  }

  async getUser(id: string): Promise<UserEntity> {
    const user = await this.users.findOneBy({ id });
    if (!user) throw new GatewayError('not_found', `No user with id '${id}'.`);
    return user;
  }

  async disableUser(id: string): Promise<UserEntity> {
    const user = await this.getUser(id);
    if (user.disabledAt === null) {
      await this.whileAnAdminRemains({ userId: id }, (manager) =>
        manager.query(`UPDATE users SET disabled_at = $2 WHERE id = $1 AND disabled_at IS NULL`, [id, this.clock.now()]),
      );
    }
    this.forgetCachedKeys();
    return this.getUser(id);
  }

  // ---- keys ----

  /**
   * Returns the secret once; only its hash is stored. 409 for a disabled user or a user of a
   * disabled department: the key would be refused on every request.
   */
  async createKey(input: { userId: string; name?: string; expiresAt?: Date }): Promise<{ entity: ApiKeyEntity; key: string }> {
    const user = await this.users.findOneBy({ id: input.userId });
    if (!user) throw new GatewayError('not_found', `No user with id '${input.userId}'.`, { param: 'user_id' });
    if (input.expiresAt && input.expiresAt.getTime() <= this.clock.nowMs()) {
      throw new GatewayError('invalid_value', "'expires_at' must be in the future.", { param: 'expires_at' });
    }
    if (user.disabledAt !== null) {
      throw new GatewayError('conflict', `User '${user.name}' is disabled: a key of theirs could never call the gateway.`, { param: 'user_id' });
    }
    const department = await this.departments.findOneBy({ id: user.departmentId });
    if (department?.disabledAt != null) {
      throw new GatewayError('conflict', `The department of user '${user.name}' is disabled: a key of theirs could never call the gateway.`, {
        param: 'user_id',
      });
    }
    const key = generateApiKey();
    const entity = await this.keys.save(
      this.keys.create({ userId: user.id, name: input.name ?? null, prefix: keyPrefix(key), keyHash: hashApiKey(key), expiresAt: input.expiresAt ?? null }),
    );
    return { entity, key };
  }

  listKeys(userId?: string): Promise<ApiKeyEntity[]> {
    return this.keys.find({ where: userId ? { userId } : {}, order: { createdAt: 'ASC' } });
  }

  async revokeKey(id: string): Promise<ApiKeyEntity> {
    const key = await this.keys.findOneBy({ id });
    if (!key) throw new GatewayError('not_found', `No key with id '${id}'.`);
    if (key.revokedAt !== null) {
      // Revoked already, perhaps by another instance: this one stops accepting it now too.
      this.forgetCachedKeys();
      return key;
    }
    await this.whileAnAdminRemains({ keyId: id }, (manager) => this.markRevoked(id, manager));
    // Re-read: a revocation that won the race keeps its own time.
    return (await this.keys.findOneBy({ id })) ?? key;
  }

  /**
   * Stores ADMIN_API_KEY (hashed, flagged `from_env`; idempotent across instances) and revokes the
   * keys earlier values of it left behind, so rotating the secret retires the old one.
   *
   * Only rows older than this key's own are revoked: during a rolling deploy a pod still started
   * with the previous secret must not revoke its successor, so replicas cannot take turns locking
   * each other out. Nothing is revoked, and this key is never un-revoked, when this key itself does
   * not work (an admin revoked it, or disabled its user or department): a deliberate revocation
   * stands, and revoking its predecessors too could leave nobody able to reach the admin API.
   */
  async ensureEnvKey(userId: string, key: string): Promise<EnvKeyOutcome> {
    const keyHash = hashApiKey(key);
    const inserted = await this.dataSource.query<unknown[]>(
      `INSERT INTO api_keys (user_id, name, prefix, key_hash, from_env) VALUES ($1, $2, $3, $4, true) ON CONFLICT DO NOTHING RETURNING id`,
      [userId, ENV_KEY_NAME, keyPrefix(key), keyHash],
    );
    const created = inserted.length > 0;
    const [own] = await this.dataSource.query<Array<{ id: string; prefix: string; revoked_at: Date | null }>>(
      `SELECT id, prefix, revoked_at FROM api_keys WHERE key_hash = $1`,
      [keyHash],
    );
    if (!own) throw new Error('ADMIN_API_KEY row missing after insert');
    const ownKey = { keyId: own.id, prefix: own.prefix, created };
    if (own.revoked_at !== null) return { ...ownKey, state: 'revoked', revoked: [] };
    const principal = await this.lookup(keyHash);
    if (principal?.role !== 'admin' || (principal.expiresAt !== undefined && principal.expiresAt <= this.clock.nowMs())) {
      return { ...ownKey, state: 'unusable', revoked: [] };
    }
    // Compared in SQL: created_at has microseconds, a JavaScript Date only milliseconds.
    const older = await this.dataSource.query<Array<{ id: string; prefix: string }>>(
      `SELECT id, prefix FROM api_keys
        WHERE from_env AND revoked_at IS NULL AND id <> $1 AND created_at < (SELECT created_at FROM api_keys WHERE id = $1)
        ORDER BY created_at`,
      [own.id],
    );
    const revoked: Array<{ keyId: string; prefix: string }> = [];
    for (const old of older) if (await this.revokeIfActive(old.id)) revoked.push({ keyId: old.id, prefix: old.prefix });
    return { ...ownKey, state: 'usable', revoked };
  }

  /** revokeKey's last-admin rule, skipping instead of refusing: a start must not fail over a rotation. */
  private async revokeIfActive(id: string): Promise<boolean> {
    return this.underAdminGuard({ keyId: id }, 0, (manager) => this.markRevoked(id, manager), () => false);
  }

  /**
   * Revokes a key nobody was ever shown (the one a failed first start generated), without
   * revokeKey's last-admin rule, which would refuse exactly this: it is the install's only admin
   * key, and the next start must generate (and show) another. True when this call revoked it.
   */
  async withdrawUnshownKey(id: string): Promise<boolean> {
    const revoked = await this.markRevoked(id, this.dataSource);
    this.forgetCachedKeys();
    return revoked;
  }

  /**
   * Every revocation, the admin API's, a rotation's and a failed start's: one conditional update, so that instances
   * revoking the same key at once revoke it once (one audit row from a rotation, not one per
   * replica). Run under the admin guard, which drops the key cache once it commits.
   */
  private async markRevoked(id: string, manager: Pick<EntityManager, 'query'>): Promise<boolean> {
    const rows = await manager.query<unknown[]>(
      `WITH changed AS (UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING id) SELECT id FROM changed`,
      [id, this.clock.now()],
    );
    return rows.length > 0;
  }

  async hasActiveAdminKey(): Promise<boolean> {
    return this.adminKeyOutside({});
  }

  /**
   * Whether a usable admin key exists (not revoked or expired, its user and department enabled)
   * other than the key, or the keys of the user or department, given; with `lastingSeconds`, one
   * that is still usable that long from now.
   */
  private async adminKeyOutside(except: Except, lastingSeconds = 0, manager: Pick<EntityManager, 'query'> = this.dataSource): Promise<boolean> {
    const rows: unknown[] = await manager.query(
      `SELECT 1 FROM api_keys k JOIN users u ON u.id = k.user_id JOIN departments d ON d.id = u.department_id
        WHERE u.role = 'admin' AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND d.disabled_at IS NULL
          AND (k.expires_at IS NULL OR k.expires_at > now() + make_interval(secs => $4))
          AND ($1::uuid IS NULL OR k.id <> $1::uuid) AND ($2::uuid IS NULL OR u.id <> $2::uuid) AND ($3::uuid IS NULL OR d.id <> $3::uuid)
        LIMIT 1`,
      [except.keyId ?? null, except.userId ?? null, except.departmentId ?? null, lastingSeconds],
    );
    return rows.length > 0;
  }

  /**
   * Whether the key, user or department given holds a usable admin key: only then can turning it
   * off cost the admin API. Without this, once every admin key expired within the guard's 24 hours,
   * an ordinary user's leaked key could not be revoked at all.
   */
  private async adminKeyWithin(target: Except, manager: Pick<EntityManager, 'query'>): Promise<boolean> {
    const rows: unknown[] = await manager.query(
      `SELECT 1 FROM api_keys k JOIN users u ON u.id = k.user_id JOIN departments d ON d.id = u.department_id
        WHERE u.role = 'admin' AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND d.disabled_at IS NULL
          AND (k.expires_at IS NULL OR k.expires_at > now())
          AND (k.id = $1::uuid OR u.id = $2::uuid OR d.id = $3::uuid)
        LIMIT 1`,
      [target.keyId ?? null, target.userId ?? null, target.departmentId ?? null],
    );
    return rows.length > 0;
  }

  /**
   * Makes a revoke or disable, refusing it when it would leave no usable admin key: nobody could
   * reach the admin API to undo it, and a restart would not bring one back (ADMIN_API_KEY's row,
   * or the generated key's user or department, is the one just turned off). Create another admin
   * key first. The check and the change are one transaction under ADMIN_GUARD_LOCK, so two such
   * changes at once are decided one after the other (READ COMMITTED: the second's check sees the
   * first's change).
   */
  private whileAnAdminRemains<T>(except: Except, change: (manager: EntityManager) => Promise<T>): Promise<T> {
    // A key about to expire does not count: the admin API would be lost with it a moment later
    // (and a restart with the same ADMIN_API_KEY would not bring back the revoked one).
    return this.underAdminGuard(except, ADMIN_KEY_MUST_LAST_S, change, () => {
      throw new GatewayError(
        'conflict',
        'This would leave no admin key usable for the next 24 hours, and nobody could reach the admin API to undo it; create another admin key (without expires_at, or expiring later) first.',
      );
    });
  }

  /**
   * `change` when an admin key usable `lastingSeconds` from now remains outside `except`, else
   * `refused()`: check and change in one transaction under ADMIN_GUARD_LOCK. The key cache is
   * dropped once it has committed (dropped before, a lookup in between could cache a key just
   * revoked or disabled as still valid), so this instance stops accepting it at once.
   */
  private async underAdminGuard<T>(except: Except, lastingSeconds: number, change: (manager: EntityManager) => Promise<T>, refused: () => T): Promise<T> {
    const result = await this.dataSource.transaction(async (manager) => {
      await manager.query('SELECT pg_advisory_xact_lock($1)', [ADMIN_GUARD_LOCK]);
      const allowed = !(await this.adminKeyWithin(except, manager)) || (await this.adminKeyOutside(except, lastingSeconds, manager));
      return allowed ? change(manager) : refused();
    });
    this.forgetCachedKeys();
    return result;
  }

  /** The built-in admin user that owns bootstrap keys; created once, shared by all instances. */
  async ensureBootstrapAdmin(): Promise<UserEntity> {
    await this.dataSource.query(`INSERT INTO departments (name) VALUES ('gatehouse-admins') ON CONFLICT DO NOTHING`);
    const [department] = await this.dataSource.query<Array<{ id: string }>>(`SELECT id FROM departments WHERE lower(name) = 'gatehouse-admins'`);
    if (!department) throw new Error('bootstrap department missing after insert');
    // Replicas starting together create it once: an enabled user's name is unique in its department.
    await this.dataSource.query(`INSERT INTO users (name, department_id, role) VALUES ('bootstrap-admin', $1, 'admin') ON CONFLICT DO NOTHING`, [
      department.id,
    ]);
    // Case-insensitively, as the index compares: a 'Bootstrap-Admin' an admin made there is the one.
    const existing = await this.users
      .createQueryBuilder('u')
      .where(`u.department_id = :id AND lower(u.name) = 'bootstrap-admin' AND u.disabled_at IS NULL`, { id: department.id })
      .getOne();
    if (!existing) throw new Error('bootstrap admin user missing after insert');
    return existing;
  }
}

function departmentNameTaken(name: string, cause?: unknown): GatewayError {
  return new GatewayError('conflict', `A department named '${name}' already exists.`, { param: 'name', cause });
}

function userNameTaken(name: string, department: string, cause?: unknown): GatewayError {
  return new GatewayError('conflict', `Department '${department}' already has a user named '${name}'.`, { param: 'name', cause });
}

function uniqueViolation(error: unknown): boolean {
  return typeof error === 'object' && error !== null && (error as { code?: unknown }).code === '23505';
}
