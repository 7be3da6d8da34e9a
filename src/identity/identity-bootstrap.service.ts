import { Injectable, type OnApplicationBootstrap, Optional } from '@nestjs/common';
import type { Logger } from 'pino';
import { AuditService } from '../audit/audit.service.js';
import { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { IdentityService } from './identity.service.js';

/**
 * Makes sure an admin can get in on a fresh install (API.md "Bootstrap"): ADMIN_API_KEY is
 * stored (hashed) as an admin key; without it, the embedded default generates one and prints it
 * once to stdout, outside the JSON log, so it never lands in a log pipeline.
 *
 * The generated key is stored while the app initialises, before the server listens, but printed
 * only once the start has succeeded (`announceGeneratedKey`); a start that fails after storing it
 * (a port already taken, most often) revokes it (`withdrawGeneratedKey`). Otherwise the install's
 * only admin key would be one shown by a start that died, and the next, successful start would
 * find it active and show none.
 *
 * Setting a new ADMIN_API_KEY rotates it: the start with the new secret revokes the keys earlier
 * values left behind (docs/operations.md "Rotating ADMIN_API_KEY").
 */
@Injectable()
export class IdentityBootstrapService implements OnApplicationBootstrap {
  /** Set when this start generated a key; tests and the demo read it from here, not from logs. */
  generatedAdminKey: string | undefined;

  private generated: { id: string; prefix: string } | undefined;

  constructor(
    private readonly identity: IdentityService,
    private readonly config: AppConfig,
    private readonly appLogger: AppLogger,
    // Global AuditModule; absent only where a test builds identity alone.
    @Optional() private readonly audit?: AuditService,
  ) {}

  async onApplicationBootstrap(): Promise<void> {
    const logger = this.appLogger.logger.child({ context: 'IdentityBootstrap' });
    const admin = await this.identity.ensureBootstrapAdmin();
    if (this.config.adminApiKey) {
      await this.ensureEnvKey(admin.id, this.config.adminApiKey, logger);
      return;
    }
    if (await this.identity.hasActiveAdminKey()) return;
    if (this.config.database.driver === 'postgres') {
      // A shared production database must not get a key that only one pod's stdout ever saw.
      throw new Error('No admin key exists in this database: set ADMIN_API_KEY for the first start on PostgreSQL.');
    }
    const { entity, key } = await this.identity.createKey({ userId: admin.id, name: 'bootstrap (generated on first start)' });
    this.generatedAdminKey = key;
    this.generated = { id: entity.id, prefix: entity.prefix };
    this.recordCreated(entity.id, entity.prefix, 'first start without ADMIN_API_KEY: generated');
  }

  /** Prints the key this start generated, if any: called once the gateway listens. */
  announceGeneratedKey(): void {
    const key = this.generatedAdminKey;
    if (key === undefined) return;
    this.appLogger.logger
      .child({ context: 'IdentityBootstrap' })
      .warn('Generated the first admin API key; it is printed once on stdout and stored only as a hash.');
    process.stdout.write(
      `\n${'='.repeat(72)}\n  Gatehouse admin API key (shown once, stored only as a hash):\n\n    ${key}\n\n  Use it as "Authorization: Bearer <key>". Set ADMIN_API_KEY to choose your own.\n${'='.repeat(72)}\n\n`,
    );
  }

  /**
   * Revokes the key this start generated, for a start that failed before announcing it: nobody has
   * seen it, so the next start must generate (and show) another. Without the last-admin-key guard
   * of an admin's revocation, which would refuse exactly this: it is the install's only admin key.
   */
  async withdrawGeneratedKey(): Promise<void> {
    const generated = this.generated;
    if (generated === undefined) return;
    this.generated = undefined;
    this.generatedAdminKey = undefined;
    if (!(await this.identity.withdrawUnshownKey(generated.id))) return;
    const { id, prefix } = generated;
    this.audit?.record({
      action: 'bootstrap.revoke_key',
      targetType: 'keys',
      targetId: id,
      details: { actor: 'system:bootstrap', reason: 'start failed before the generated key was shown', prefix },
    });
  }

  private async ensureEnvKey(userId: string, key: string, logger: Logger): Promise<void> {
    const outcome = await this.identity.ensureEnvKey(userId, key);
    const own = { key_id: outcome.keyId, key_prefix: outcome.prefix };
    // Only the start that stored it (of replicas storing the same new secret at once, one).
    if (outcome.created) this.recordCreated(outcome.keyId, outcome.prefix, 'ADMIN_API_KEY set');
    switch (outcome.state) {
      case 'revoked':
        logger.warn(own, 'ADMIN_API_KEY names a revoked key and does not work; it stays revoked. Set ADMIN_API_KEY to a new secret to rotate it.');
        return;
      case 'unusable':
        logger.warn(own, 'ADMIN_API_KEY does not work: its user or department is disabled. No earlier ADMIN_API_KEY key was revoked.');
        return;
      case 'usable':
        break;
    }
    for (const old of outcome.revoked) {
      logger.warn({ ...own, revoked_key_id: old.keyId, revoked_key_prefix: old.prefix }, 'revoked the key of an earlier ADMIN_API_KEY (rotated)');
      // The same trail an admin's DELETE /admin/keys/:id leaves, with the system as the actor.
      this.audit?.record({
        action: 'bootstrap.revoke_key',
        targetType: 'keys',
        targetId: old.keyId,
        details: { actor: 'system:bootstrap', reason: 'ADMIN_API_KEY rotated', prefix: old.prefix, replaced_by: own },
      });
    }
  }

  /** The trail an admin's POST /admin/keys leaves, with the system as the actor: id and prefix, never the secret. */
  private recordCreated(keyId: string, prefix: string, reason: string): void {
    this.audit?.record({ action: 'bootstrap.create_key', targetType: 'keys', targetId: keyId, details: { actor: 'system:bootstrap', reason, prefix } });
  }
}
