import { Injectable, type OnApplicationBootstrap } from '@nestjs/common';
import { AppConfig } from '../config/config.js';
import { AppLogger } from '../core/logger.js';
import { IdentityService } from './identity.service.js';

/**
 * Makes sure an admin can get in on a fresh install (API.md "Bootstrap"): ADMIN_API_KEY is
 * stored (hashed) as an admin key; without it, the embedded default generates one and prints it
 * once to stdout, outside the JSON log, so it never lands in a log pipeline.
 */
@Injectable()
export class IdentityBootstrapService implements OnApplicationBootstrap {
  /** Set when this start generated a key; tests and the demo read it from here, not from logs. */
  generatedAdminKey: string | undefined;

  constructor(
    private readonly identity: IdentityService,
    private readonly config: AppConfig,
    private readonly appLogger: AppLogger,
  ) {}

  async onApplicationBootstrap(): Promise<void> {
    const logger = this.appLogger.logger.child({ context: 'IdentityBootstrap' });
    const admin = await this.identity.ensureBootstrapAdmin();
    if (this.config.adminApiKey) {
      await this.identity.ensureKey(admin.id, this.config.adminApiKey, 'bootstrap (ADMIN_API_KEY)');
      return;
    }
    if (await this.identity.hasActiveAdminKey()) return;
    if (this.config.database.driver === 'postgres') {
      // A shared production database must not get a key that only one pod's stdout ever saw.
      throw new Error('No admin key exists in this database: set ADMIN_API_KEY for the first start on PostgreSQL.');
    }
    const { key } = await this.identity.createKey({ userId: admin.id, name: 'bootstrap (generated on first start)' });
    this.generatedAdminKey = key;
    logger.warn('Generated the first admin API key; it is printed once on stdout and stored only as a hash.');
    process.stdout.write(
      `\n${'='.repeat(72)}\n  Gatehouse admin API key (shown once, stored only as a hash):\n\n    ${key}\n\n  Use it as "Authorization: Bearer <key>". Set ADMIN_API_KEY to choose your own.\n${'='.repeat(72)}\n\n`,
    );
  }
}
