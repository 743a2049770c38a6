"""PostgreSQL: the append-only trigger lets ``manage.py prune_audit`` delete the head of the
chain, and nothing else.

The one escape is deliberate and narrow: a DELETE passes only for rows whose ``seq`` is at or
below ``berth.audit_prune_through``, a setting that ``audit.retention.prune`` sets with
``SET LOCAL`` (it ends with the transaction) after writing the ``audit.pruned`` checkpoint.
Any other DELETE or UPDATE is still refused, as in 0002.
"""

from django.db import migrations

WITH_PRUNE = """
CREATE OR REPLACE FUNCTION audit_auditevent_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE'
     AND (NEW.actor_id IS NULL OR NEW.actor_id IS NOT DISTINCT FROM OLD.actor_id)
     AND (NEW.team_id IS NULL OR NEW.team_id IS NOT DISTINCT FROM OLD.team_id)
     AND (to_jsonb(NEW) - 'actor_id' - 'team_id') = (to_jsonb(OLD) - 'actor_id' - 'team_id') THEN
    RETURN NEW;
  END IF;
  IF TG_OP = 'DELETE'
     AND OLD.seq <= COALESCE(
       NULLIF(current_setting('berth.audit_prune_through', true), '')::bigint, 0) THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'audit_auditevent is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""

WITHOUT_PRUNE = """
CREATE OR REPLACE FUNCTION audit_auditevent_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE'
     AND (NEW.actor_id IS NULL OR NEW.actor_id IS NOT DISTINCT FROM OLD.actor_id)
     AND (NEW.team_id IS NULL OR NEW.team_id IS NOT DISTINCT FROM OLD.team_id)
     AND (to_jsonb(NEW) - 'actor_id' - 'team_id') = (to_jsonb(OLD) - 'actor_id' - 'team_id') THEN
    RETURN NEW;
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
    dependencies = [("audit", "0003_review_indexes")]

    operations = [
        migrations.RunPython(
            _on_postgresql(WITH_PRUNE), _on_postgresql(WITHOUT_PRUNE), elidable=False
        )
    ]
