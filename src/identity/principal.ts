import type { CacheScope, UserRole } from './identity.entities.js';

/** Who is calling, resolved from the API key only (never from the body). */
export interface Principal {
  readonly keyId: string;
  readonly keyPrefix: string;
  readonly userId: string;
  readonly departmentId: string;
  readonly role: UserRole;
  readonly cacheScope: CacheScope;
  /** undefined for the bootstrap ADMIN_API_KEY, which has no row until the first start stores it. */
  readonly expiresAt: number | undefined;
}
