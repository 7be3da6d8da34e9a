import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * Append-only audit trail. `hash = sha256(prev_hash || canonical JSON of the event)`; the one-row
 * `audit_chain_head` is locked (`FOR UPDATE`) by every writer, so instances sharing one database
 * extend a single chain in seq order. The trigger makes ordinary UPDATE/DELETE/TRUNCATE fail; the
 * chain is what catches someone who gets around it (a superuser disabling the trigger).
 */
export class AuditEvents1764400004000 implements MigrationInterface {
  name = 'AuditEvents1764400004000';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`CREATE TABLE audit_events (
      seq bigserial PRIMARY KEY,
      id uuid NOT NULL,
      at timestamptz NOT NULL,
      actor_user_id uuid,
      actor_key_id uuid,
      actor_role text,
      action text NOT NULL,
      target_type text,
      target_id text,
      request_id text,
      status integer,
      details jsonb NOT NULL DEFAULT '{}'::jsonb,
      prev_hash text NOT NULL,
      hash text NOT NULL
    )`);
    // A retried flush whose first COMMIT did land must not insert its events twice.
    await q.query('CREATE UNIQUE INDEX audit_events_id_uq ON audit_events (id)');
    await q.query('CREATE INDEX audit_events_at_idx ON audit_events (at)');
    await q.query('CREATE INDEX audit_events_action_idx ON audit_events (action, seq)');
    await q.query('CREATE INDEX audit_events_actor_user_idx ON audit_events (actor_user_id, seq)');
    await q.query('CREATE INDEX audit_events_actor_key_idx ON audit_events (actor_key_id, seq)');
    await q.query(`CREATE TABLE audit_chain_head (
      id smallint PRIMARY KEY CHECK (id = 1),
      seq bigint NOT NULL,
      hash text NOT NULL
    )`);
    await q.query(`INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 0, repeat('0', 64))`);
    await q.query(`CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        RAISE EXCEPTION 'audit_events is append-only';
      END
    $$`);
    await q.query(`CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
      FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()`);
    await q.query(`CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
      FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query('DROP TABLE audit_chain_head');
    await q.query('DROP TABLE audit_events');
    await q.query('DROP FUNCTION audit_events_append_only()');
  }
}
