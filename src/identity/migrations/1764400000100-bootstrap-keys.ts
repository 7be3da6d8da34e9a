import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Marks the keys provisioned from ADMIN_API_KEY, so a start with a rotated secret can revoke the
 * ones it replaces. A flag rather than the name: an admin may give any key that name through the
 * API. Rows from before this migration are recognised the only way they can be: the name the
 * bootstrap gave them, on the bootstrap admin user it gave it to.
 */
export class BootstrapKeys1764400000100 implements MigrationInterface {
  name = 'BootstrapKeys1764400000100';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE api_keys ADD COLUMN from_env boolean NOT NULL DEFAULT false`);
    await q.query(`UPDATE api_keys k SET from_env = true
      FROM users u JOIN departments d ON d.id = u.department_id
     WHERE u.id = k.user_id AND k.name = 'bootstrap (ADMIN_API_KEY)' AND u.name = 'bootstrap-admin' AND lower(d.name) = 'gatehouse-admins'`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('ALTER TABLE api_keys DROP COLUMN from_env');
  }
}
