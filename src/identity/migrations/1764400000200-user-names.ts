import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * User names are unique within a department regardless of case, as department names are: a
 * unique index on (department_id, lower(name)), so two concurrent `POST /admin/users` cannot both
 * win (the second is 409). Only enabled users count: a user cannot be re-enabled, so disabling
 * one (DELETE /admin/users/{id}) frees the name, and the start-up bootstrap may create a new
 * `bootstrap-admin` when an admin disabled the old one.
 *
 * A database from before this migration may hold enabled duplicates. They are renamed, not
 * refused: in each department the earliest-created user (then the lowest id) keeps the name, and
 * each later one becomes `<its name> (2)`, `(3)`, … (the first suffix not taken). Names are only
 * labels: keys, budgets, spend and audit rows refer to users by id, so nothing else changes. The
 * table is locked while this runs, so an instance of the previous release cannot add a duplicate
 * between the renames and the index.
 */
export class UserNames1764400000200 implements MigrationInterface {
  name = 'UserNames1764400000200';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE`);
    const duplicates = (await q.query(
      `SELECT id, department_id, name
         FROM (SELECT id, department_id, name, created_at,
                      row_number() OVER (PARTITION BY department_id, lower(name) ORDER BY created_at, id) AS nth
                 FROM users WHERE disabled_at IS NULL) ranked
        WHERE nth > 1
        ORDER BY department_id, lower(name), created_at, id`,
    )) as Array<{ id: string; department_id: string; name: string }>;
    for (const user of duplicates) {
      for (let suffix = 2; ; suffix += 1) {
        const candidate = `${user.name} (${suffix})`;
        const taken = (await q.query(`SELECT 1 FROM users WHERE department_id = $1 AND lower(name) = lower($2) AND disabled_at IS NULL`, [
          user.department_id,
          candidate,
        ])) as unknown[];
        if (taken.length > 0) continue;
        await q.query(`UPDATE users SET name = $2 WHERE id = $1`, [user.id, candidate]);
        break;
      }
    }
    await q.query(`CREATE UNIQUE INDEX users_department_name_uq ON users (department_id, lower(name)) WHERE disabled_at IS NULL`);
  }

  async down(q: QueryRunner): Promise<void> {
    // The renames stay: the old names were ambiguous.
    await q.query('DROP INDEX users_department_name_uq');
  }
}
