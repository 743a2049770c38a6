"""Only a privileged function may prune the audit trail (PostgreSQL).

Until 0005 the append-only trigger let a DELETE through when the session set
``berth.audit_prune_through`` and an ``audit.pruned`` event named it — both within reach of the
application's own role, so a forged checkpoint (hashed with the public ``event_hash``) erased
the head of the chain and verification still passed. Now:

- ``audit_auditprune`` records each sanctioned prune; verification starts after one of these
  rows, never after a mere ``audit.pruned`` event;
- ``berth_audit_prune(through_seq, checkpoint_seq)`` is SECURITY DEFINER, owned by the role that
  runs this migration (the schema's owner); EXECUTE is revoked from PUBLIC, so only a role the
  operator grants it to (``berth_pruner``) may call it. It checks the checkpoint links into the
  chain, records the prune and deletes the rows;
- the trigger lets a DELETE of audit events through only when the current role is that
  function's owner (true inside the function, never for the application's role) and the prune
  is recorded; ``audit_auditprune`` accepts rows from that owner only, and never changes.

Existing prunes (checkpoints that explain the stored chain's start) are carried over.
"""

import json
from importlib import import_module

import django.utils.timezone
from django.db import migrations, models

# Reversing restores 0005's trigger function.
WITH_CHECKPOINT = import_module("audit.migrations.0005_prune_needs_checkpoint").WITH_CHECKPOINT

# The advisory lock of audit.trail.CHAIN_LOCK_KEY ("berthaud"), taken again inside the function.
CREATE = """
CREATE OR REPLACE FUNCTION berth_audit_prune(p_through bigint, p_checkpoint bigint)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
  checkpoint audit_auditevent%ROWTYPE;
  removed_hash text;
  newest bigint;
  unlinked bigint;
  removed bigint;
  last_prune audit_auditprune%ROWTYPE;
BEGIN
  PERFORM pg_advisory_xact_lock(7090054373633094756);
  SELECT * INTO checkpoint FROM audit_auditevent WHERE seq = p_checkpoint;
  IF NOT FOUND OR checkpoint.action <> 'audit.pruned' OR checkpoint.outcome <> 'ok' THEN
    RAISE EXCEPTION 'berth_audit_prune: event % is not an audit.pruned checkpoint', p_checkpoint
      USING ERRCODE = 'check_violation';
  END IF;
  SELECT max(seq) INTO newest FROM audit_auditevent;
  IF newest <> p_checkpoint THEN
    RAISE EXCEPTION 'berth_audit_prune: the checkpoint % is not the newest event (%)',
      p_checkpoint, newest USING ERRCODE = 'check_violation';
  END IF;
  SELECT hash INTO removed_hash FROM audit_auditevent WHERE seq = p_through;
  IF removed_hash IS NULL OR p_through >= p_checkpoint
     OR (checkpoint.payload_json::jsonb ->> 'through_seq') IS DISTINCT FROM p_through::text
     OR (checkpoint.payload_json::jsonb ->> 'through_hash') IS DISTINCT FROM removed_hash THEN
    RAISE EXCEPTION 'berth_audit_prune: the checkpoint does not name event % and its hash',
      p_through USING ERRCODE = 'check_violation';
  END IF;
  SELECT * INTO last_prune FROM audit_auditprune ORDER BY through_seq DESC LIMIT 1;
  IF (SELECT ROW(seq, prev_hash) FROM audit_auditevent ORDER BY seq LIMIT 1)
     IS DISTINCT FROM ROW(COALESCE(last_prune.through_seq, 0) + 1,
                          COALESCE(last_prune.through_hash, repeat('0', 64))) THEN
    RAISE EXCEPTION 'berth_audit_prune: the chain does not start where the last prune left it'
      USING ERRCODE = 'check_violation';
  END IF;
  SELECT count(*) INTO unlinked FROM (
    SELECT seq, prev_hash, lag(seq) OVER w AS prior_seq, lag(hash) OVER w AS prior_hash
    FROM audit_auditevent WINDOW w AS (ORDER BY seq)
  ) AS links
  WHERE prior_seq IS NOT NULL AND (seq <> prior_seq + 1 OR prev_hash <> prior_hash);
  IF unlinked > 0 THEN
    RAISE EXCEPTION 'berth_audit_prune: the chain does not link (% breaks): verify it first',
      unlinked USING ERRCODE = 'check_violation';
  END IF;
  SELECT count(*) INTO removed FROM audit_auditevent WHERE seq <= p_through;
  INSERT INTO audit_auditprune (through_seq, through_hash, checkpoint_seq, deleted, time, pruned_by)
  VALUES (p_through, removed_hash, p_checkpoint, removed, now(), session_user);
  PERFORM set_config('berth.audit_prune_through', p_through::text, true);
  DELETE FROM audit_auditevent WHERE seq <= p_through;
  PERFORM set_config('berth.audit_prune_through', '', true);
  RETURN removed;
END;
$$;
REVOKE ALL ON FUNCTION berth_audit_prune(bigint, bigint) FROM PUBLIC;

-- The role the trigger lets delete: the owner of berth_audit_prune (current_user inside it).
CREATE OR REPLACE FUNCTION berth_audit_pruner() RETURNS name
LANGUAGE sql STABLE AS $$
  SELECT pg_get_userbyid(proowner) FROM pg_proc
  WHERE oid = 'berth_audit_prune(bigint, bigint)'::regprocedure
$$;


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
  IF TG_OP = 'DELETE' AND current_user = berth_audit_pruner() THEN
    through := NULLIF(current_setting('berth.audit_prune_through', true), '')::bigint;
    IF OLD.seq <= through
       AND EXISTS (SELECT 1 FROM audit_auditprune WHERE through_seq = through) THEN
      RETURN OLD;
    END IF;
  END IF;
  RAISE EXCEPTION 'audit_auditevent is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION audit_auditprune_guard() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'INSERT' AND current_user = berth_audit_pruner() THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'audit_auditprune is written by berth_audit_prune() only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_auditprune_guard
  BEFORE INSERT OR UPDATE OR DELETE ON audit_auditprune
  FOR EACH ROW EXECUTE FUNCTION audit_auditprune_guard();
"""

DROP = (
    """
DROP TRIGGER IF EXISTS audit_auditprune_guard ON audit_auditprune;
DROP FUNCTION IF EXISTS audit_auditprune_guard();
"""
    + WITH_CHECKPOINT
    + """
DROP FUNCTION IF EXISTS berth_audit_prune(bigint, bigint);
DROP FUNCTION IF EXISTS berth_audit_pruner();
"""
)


def _on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)

    return run


def carry_over_prunes(apps, schema_editor):
    """The checkpoint that explains where the stored chain starts becomes a prune record."""
    events = apps.get_model("audit", "AuditEvent").objects.using(schema_editor.connection.alias)
    first = events.order_by("seq").values_list("seq", flat=True).first()
    if first is None or first == 1:
        return
    for event in events.filter(action="audit.pruned", outcome="ok").order_by("-seq")[:20]:
        payload = json.loads(event.payload_json)
        if payload.get("through_seq") == first - 1 and isinstance(payload.get("through_hash"), str):
            apps.get_model("audit", "AuditPrune").objects.using(
                schema_editor.connection.alias
            ).create(
                through_seq=first - 1,
                through_hash=payload["through_hash"],
                checkpoint_seq=event.seq,
                deleted=payload.get("deleted") or 0,
                time=event.time,
                pruned_by="carried over by migration 0007",
            )
            return


class Migration(migrations.Migration):
    dependencies = [("audit", "0006_alter_auditevent_actor_kind")]

    operations = [
        migrations.CreateModel(
            name="AuditPrune",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("through_seq", models.PositiveBigIntegerField(unique=True)),
                ("through_hash", models.CharField(max_length=64)),
                ("checkpoint_seq", models.PositiveBigIntegerField()),
                ("deleted", models.PositiveBigIntegerField()),
                ("time", models.DateTimeField(default=django.utils.timezone.now)),
                ("pruned_by", models.CharField(blank=True, max_length=150)),
            ],
            options={"ordering": ["-through_seq"]},
        ),
        migrations.RunPython(carry_over_prunes, migrations.RunPython.noop, elidable=False),
        migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP), elidable=False),
    ]
