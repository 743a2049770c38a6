"""PostgreSQL: the prune escape of 0004 also needs the checkpoint it promises.

0004 let a DELETE through for any row at or below ``berth.audit_prune_through``, a setting any
session may set to any value: ``SET berth.audit_prune_through = '999999999'`` then removed the
newest events too, and a chain cut at its tail still verifies. Now a DELETE passes only when the
table also holds the ``audit.pruned`` event that ``audit.retention.prune_before`` records first:
newer than every removed row, naming exactly that ``through_seq``. The tail can no longer be cut,
and every removal is explained by a checkpoint in the chain.
"""

from importlib import import_module

from django.db import migrations

# Reversing restores 0004's function.
WITH_PRUNE = import_module("audit.migrations.0004_prune_escape").WITH_PRUNE

WITH_CHECKPOINT = """
CREATE OR REPLACE FUNCTION audit_auditevent_append_only() RETURNS trigger AS $$
DECLARE
  through bigint;
BEGIN
  IF TG_OP = 'UPDATE'
     AND (NEW.actor_id IS NULL OR NEW.actor_id IS NOT DISTINCT FROM OLD.actor_id)
     AND (NEW.team_id IS NULL OR NEW.team_id IS NOT DISTINCT FROM OLD.team_id)
     AND (to_jsonb(NEW) - 'actor_id' - 'team_id') = (to_jsonb(OLD) - 'actor_id' - 'team_id') THEN
    RETURN NEW;
  END IF;
  IF TG_OP = 'DELETE' THEN
    through := NULLIF(current_setting('berth.audit_prune_through', true), '')::bigint;
    IF OLD.seq <= through AND EXISTS (
         SELECT 1 FROM audit_auditevent checkpoint
         WHERE checkpoint.action = 'audit.pruned'
           AND checkpoint.outcome = 'ok'
           AND checkpoint.seq > through
           AND checkpoint.payload_json::jsonb ->> 'through_seq' = through::text) THEN
      RETURN OLD;
    END IF;
  END IF;
  RAISE EXCEPTION 'audit_auditevent is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


def _on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [("audit", "0004_prune_escape")]

    operations = [
        migrations.RunPython(
            _on_postgresql(WITH_CHECKPOINT), _on_postgresql(WITH_PRUNE), elidable=False
        )
    ]
