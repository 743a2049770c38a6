"""Finding 2 of the attack on a running console (issue 15): the application's database role
erased the head of the audit trail with a forged ``audit.pruned`` checkpoint, and verification
still passed. Now only a privileged function may prune, and signed anchors outside the database
say what the chain held."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction

import audit
from audit import anchors
from audit.actions import Action
from audit.models import AuditEvent, AuditPrune
from audit.retention import PruneRefused, prune_before
from audit.verification import verify_stored_chain
from config.checks import check_audit_anchors
from tests.conftest import BASE_DIR, clean_environ, run_manage

pytestmark = pytest.mark.django_db
EVENTS = 60
FORGED_THROUGH = 40
ANCHOR_KEY = "k" * 48


@pytest.fixture
def trail() -> list[AuditEvent]:
    """Sixty events written the ordinary way."""
    return [audit.record(Action.GC_RAN, step=index) for index in range(EVENTS)]


@pytest.fixture
def anchor_dir(tmp_path: Path, settings) -> Path:
    """Anchors on: a directory and a key the database role does not have."""
    directory = tmp_path / "anchors"
    directory.mkdir()
    settings.BERTH_AUDIT_ANCHOR_DIR = str(directory)
    settings.BERTH_AUDIT_ANCHOR_KEY = ANCHOR_KEY
    return directory


def _role(privileges: str) -> str:
    """A PostgreSQL role made inside the test's transaction (so it vanishes with it)."""
    name = f"berth_test_{uuid.uuid4().hex[:10]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name} NOLOGIN")
        cursor.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
        cursor.execute(f"GRANT {privileges} ON ALL TABLES IN SCHEMA public TO {name}")
        cursor.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}")
    return name


class _As:
    """``SET LOCAL ROLE`` for a block of the test's transaction (the attacker's connection)."""

    def __init__(self, role: str):
        self.role = role

    def __enter__(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL ROLE {self.role}")

    def __exit__(self, *exc: object) -> None:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")


def _forge_checkpoint(through: AuditEvent) -> AuditEvent:
    """What the attacker did: a checkpoint hashed with the public ``event_hash`` (through the
    public ``record()``, which is the same thing), naming the rows to erase."""
    return audit.record(Action.AUDIT_PRUNED, through_seq=through.seq, through_hash=through.hash)


def _delete_head_as_owner(through_seq: int) -> None:
    """What an owner of the schema (or anyone who disabled the trigger) can still do."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("DELETE FROM audit_auditevent WHERE seq <= %s", [through_seq])
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")


@pytest.mark.postgres
def test_finding_02_the_app_role_cannot_prune_with_a_forged_checkpoint(
    trail: list[AuditEvent],
) -> None:
    app = _role("SELECT, INSERT, UPDATE, DELETE")
    with _As(app):
        forged = _forge_checkpoint(trail[FORGED_THROUGH - 1])
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('berth.audit_prune_through', %s, true)", [str(FORGED_THROUGH)]
            )
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
                cursor.execute("DELETE FROM audit_auditevent WHERE seq <= %s", [FORGED_THROUGH])
            with pytest.raises(DatabaseError, match="permission denied"), transaction.atomic():
                cursor.execute("SELECT berth_audit_prune(%s, %s)", [FORGED_THROUGH, forged.seq])
        # Nor through Berth's own prune path: the role has no right to the privileged function.
        with pytest.raises(PruneRefused, match="may not prune"):
            prune_before(trail[FORGED_THROUGH].time)
    assert AuditEvent.objects.count() == EVENTS + 1
    assert not AuditPrune.objects.exists()
    result = verify_stored_chain()
    assert (result.ok, result.expected, result.found) == (True, EVENTS + 1, EVENTS + 1)


def test_finding_02_verification_reports_a_head_erased_behind_a_forged_checkpoint(
    trail: list[AuditEvent],
) -> None:
    """The rows went anyway (an owner, or the trigger disabled): a checkpoint event in the
    chain is not evidence of a sanctioned prune, so verification reports the missing head."""
    _forge_checkpoint(trail[FORGED_THROUGH - 1])
    _delete_head_as_owner(FORGED_THROUGH)
    result = verify_stored_chain()
    assert not result.ok
    assert result.first_bad_seq == 1
    out = io.StringIO()
    with pytest.raises(CommandError, match="broken at sequence 1") as broken:
        call_command("audit_verify", stdout=out)
    assert f"expected {EVENTS + 1} events, found {EVENTS + 1 - FORGED_THROUGH}" in str(broken.value)


def test_finding_02_the_latest_anchor_reports_missing_and_extra_events(
    trail: list[AuditEvent], anchor_dir: Path
) -> None:
    anchor = anchors.write_anchor(reason="test")
    assert (anchor.first_seq, anchor.last_seq, anchor.count) == (1, EVENTS, EVENTS)
    [path] = anchor_dir.iterdir()
    document = json.loads(path.read_text())
    assert document["last_hash"] == trail[-1].hash
    assert len(document["signature"]) == 64
    assert verify_stored_chain().ok
    # The head goes, with a forged checkpoint and even a forged record of a sanctioned prune
    # (written as the schema's owner, who can do anything inside the database).
    forged = _forge_checkpoint(trail[FORGED_THROUGH - 1])
    _delete_head_as_owner(FORGED_THROUGH)
    AuditPrune.objects.create(
        through_seq=FORGED_THROUGH,
        through_hash=trail[FORGED_THROUGH - 1].hash,
        checkpoint_seq=forged.seq,
        deleted=FORGED_THROUGH,
    )
    result = verify_stored_chain()
    assert not result.ok
    assert result.missing == ((1, FORGED_THROUGH),)
    assert (result.expected, result.found) == (EVENTS + 1, EVENTS + 1 - FORGED_THROUGH)
    assert "anchor" in result.reason


def test_finding_02_a_cut_tail_or_an_edited_anchor_is_reported(
    trail: list[AuditEvent], anchor_dir: Path
) -> None:
    anchors.write_anchor(reason="test")
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("DELETE FROM audit_auditevent WHERE seq > %s", [EVENTS - 3])
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")
    result = verify_stored_chain()
    assert not result.ok
    assert result.missing == ((EVENTS - 2, EVENTS),)
    assert (result.expected, result.found) == (EVENTS, EVENTS - 3)
    # An anchor rewritten to match the cut chain does not carry a valid signature.
    [path] = anchor_dir.iterdir()
    document = json.loads(path.read_text())
    document.update(last_seq=EVENTS - 3, last_hash=trail[EVENTS - 4].hash, count=EVENTS - 3)
    path.chmod(0o644)
    path.write_text(json.dumps(document))
    result = verify_stored_chain()
    assert not result.ok
    assert "signature" in result.reason


def test_finding_02_a_sanctioned_prune_anchors_the_new_start(
    trail: list[AuditEvent], anchor_dir: Path
) -> None:
    anchors.write_anchor(reason="test")
    result = prune_before(trail[FORGED_THROUGH].time)
    assert result.deleted == FORGED_THROUGH
    prune = AuditPrune.objects.get()
    assert (prune.through_seq, prune.through_hash) == (
        FORGED_THROUGH,
        trail[FORGED_THROUGH - 1].hash,
    )
    latest = anchors.latest_anchor()
    assert (latest.first_seq, latest.start_hash) == (FORGED_THROUGH + 1, prune.through_hash)
    assert latest.reason == "prune"
    verified = verify_stored_chain()
    assert verified.ok, verified.reason
    assert verified.expected == verified.found == EVENTS + 1 - FORGED_THROUGH
    out = io.StringIO()
    call_command("audit_verify", stdout=out)
    assert f"expected {verified.expected} events, found {verified.found}" in out.getvalue()


@pytest.mark.postgres
def test_finding_02_the_pruner_role_prunes_through_the_function(trail: list[AuditEvent]) -> None:
    """The role the README tells operators to create for ``prune_audit``: it may run the
    function (and write the checkpoint), nothing more."""
    pruner = _role("SELECT")
    with connection.cursor() as cursor:
        cursor.execute(f"GRANT INSERT ON audit_auditevent TO {pruner}")
        cursor.execute(f"GRANT EXECUTE ON FUNCTION berth_audit_prune(bigint, bigint) TO {pruner}")
    with _As(pruner):
        result = prune_before(trail[FORGED_THROUGH].time)
        with connection.cursor() as cursor, pytest.raises(DatabaseError), transaction.atomic():
            cursor.execute("DELETE FROM audit_auditevent WHERE seq = %s", [EVENTS])
    assert result.deleted == FORGED_THROUGH
    assert AuditEvent.objects.order_by("seq").first().seq == FORGED_THROUGH + 1
    assert verify_stored_chain().ok


def test_finding_02_agents_refuse_to_hold_the_anchor_key() -> None:
    env = clean_environ("BERTH_AUDIT_ANCHOR")
    env["BERTH_AUDIT_ANCHOR_KEY"] = ANCHOR_KEY
    result = run_manage("berth_agent", "--host", "nowhere", "--once", env=env, timeout=60)
    assert result.returncode != 0
    assert "BERTH_AUDIT_ANCHOR_KEY" in result.stderr
    assert "agent" in result.stderr


def test_finding_02_readme_names_the_roles() -> None:
    readme = (BASE_DIR / "README.md").read_text()
    for needle in ("berth_owner", "berth_app", "berth_pruner", "berth_audit_prune"):
        assert needle in readme, needle
    assert "BERTH_AUDIT_ANCHOR_DIR" in readme


def test_finding_02_check_deploy_warns_without_anchors(settings) -> None:
    settings.BERTH_AUDIT_ANCHOR_DIR = ""
    assert [warning.id for warning in check_audit_anchors(None)] == ["berth.W011"]
    settings.BERTH_AUDIT_ANCHOR_DIR = "/srv/anchors"
    settings.BERTH_AUDIT_ANCHOR_KEY = "short"
    assert [warning.id for warning in check_audit_anchors(None)] == ["berth.W012"]
    settings.BERTH_AUDIT_ANCHOR_KEY = ANCHOR_KEY
    assert check_audit_anchors(None) == []
