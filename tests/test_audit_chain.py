"""The audit trail: append-only, hash-chained, verified by ``manage.py audit_verify``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

import audit
from accounts.models import Team, User
from audit import chain
from audit.actions import Action, Outcome
from audit.models import AppendOnlyError, AuditEvent
from audit.trail import Target
from audit.verification import verify_stored_chain
from core import context

pytestmark = pytest.mark.django_db


@contextmanager
def guards_lifted() -> Iterator[None]:
    """Let a test play an attacker with database superuser rights: on PostgreSQL, row triggers
    (the append-only guard) are off for the rest of the test's transaction."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        yield
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")


def _record_five() -> list[AuditEvent]:
    return [
        audit.record(Action.GC_RAN, step=index, bytes_reclaimed=index * 1024)
        for index in range(1, 6)
    ]


def test_record_appends_a_gap_free_linked_chain() -> None:
    events = _record_five()
    assert [event.seq for event in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == chain.GENESIS_HASH
    for previous, current in itertools.pairwise(events):
        assert current.prev_hash == previous.hash
    result = verify_stored_chain()
    assert (result.ok, result.checked, result.last_seq) == (True, 5, 5)


def test_audit_verify_names_the_tampered_row() -> None:
    _record_five()
    with guards_lifted(), connection.cursor() as cursor:
        cursor.execute("UPDATE audit_auditevent SET actor_name = %s WHERE seq = 3", ["mallory"])
    with pytest.raises(
        CommandError, match="audit chain broken at sequence 3: sequence 3 was altered"
    ):
        call_command("audit_verify")


def test_audit_verify_names_the_deleted_middle_row() -> None:
    _record_five()
    with guards_lifted(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE seq = 4")
    with pytest.raises(CommandError, match="broken at sequence 4: sequence 4 is missing"):
        call_command("audit_verify")


def test_audit_verify_detects_a_rewritten_payload_even_with_a_recomputed_own_hash() -> None:
    """Editing a row and recomputing its own hash still breaks the link from the next row."""
    events = _record_five()
    forged = {name: getattr(events[1], name) for name in chain.HASHED_FIELDS}
    forged["payload_json"] = '{"bytes_reclaimed":0,"step":2}'
    forged_hash = chain.event_hash(events[1].prev_hash, forged)
    with guards_lifted(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE audit_auditevent SET payload_json = %s, hash = %s WHERE seq = 2",
            [forged["payload_json"], forged_hash],
        )
    result = verify_stored_chain()
    assert result.first_bad_seq == 3
    assert "does not link" in result.reason


def test_audit_verify_passes_and_says_so_on_an_intact_chain() -> None:
    _record_five()
    out = StringIO()
    call_command("audit_verify", stdout=out)
    assert "audit chain intact: 5 events, last sequence 5" in out.getvalue()


def test_audit_verify_record_appends_its_own_result() -> None:
    _record_five()
    call_command("audit_verify", "--record", stdout=StringIO())
    last = AuditEvent.objects.order_by("-seq").first()
    assert (last.action, last.outcome, last.payload["checked"]) == ("audit.verified", "ok", 5)


@pytest.mark.parametrize(
    "attempt",
    [
        lambda: AuditEvent.objects.update(actor_name="x"),
        lambda: AuditEvent.objects.filter(seq=1).delete(),
        lambda: AuditEvent.objects.all().delete(),
        lambda: AuditEvent.objects.create(seq=99, time=None),
        lambda: AuditEvent.objects.bulk_update(list(AuditEvent.objects.all()), ["actor_name"]),
        lambda: AuditEvent.objects.first().delete(),
        lambda: AuditEvent.objects.first().save(),
    ],
    ids=[
        "update",
        "filter-delete",
        "delete-all",
        "create",
        "bulk-update",
        "instance-delete",
        "instance-save",
    ],
)
def test_orm_writes_other_than_record_raise(attempt) -> None:
    _record_five()
    with pytest.raises(AppendOnlyError, match="append-only"):
        attempt()
    assert verify_stored_chain().ok


def test_unknown_action_is_refused_naming_the_registry() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown audit action 'model\.exploded': add it to audit\.actions\.Action",
    ):
        audit.record("model.exploded")
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize("bad", [float("nan"), object(), {1, 2}])
def test_payload_must_be_json_native(bad: object) -> None:
    with pytest.raises(TypeError, match="JSON-native"):
        audit.record(Action.GC_RAN, value=bad)


def test_payload_with_floats_and_unicode_round_trips_and_verifies() -> None:
    event = audit.record(
        Action.GC_RAN, ratio=0.9, big=1e20, name="modèle-70B", nested={"b": [1, 2], "a": None}
    )
    stored = AuditEvent.objects.get(seq=event.seq)
    assert stored.payload == {
        "ratio": 0.9,
        "big": 1e20,
        "name": "modèle-70B",
        "nested": {"a": None, "b": [1, 2]},
    }
    assert verify_stored_chain().ok


def test_target_and_team_are_copied_into_the_event(alice: User, team_a: Team) -> None:
    event = audit.record(Action.TEAM_MEMBER_ADDED, target=alice, team=team_a)
    assert (event.target_type, event.target_id, event.target_repr) == (
        "accounts.user",
        str(alice.pk),
        "alice",
    )
    assert (event.team_id, event.team_slug) == (team_a.pk, "team-a")
    path_event = audit.record(
        Action.MODEL_REGISTERED, target=Target("path", "/ceph/models/x", "/ceph/models/x")
    )
    assert (path_event.target_type, path_event.target_id) == ("path", "/ceph/models/x")


def test_actor_comes_from_the_context_or_defaults_to_system(alice: User) -> None:
    assert audit.record(Action.GC_RAN).actor_name == "system"
    with context.bind(
        actor_id=alice.pk, actor_name="alice", actor_kind="job", job_id="j1", request_id="r1"
    ):
        event = audit.record(Action.GC_RAN)
    assert (event.actor_id, event.actor_name, event.actor_kind, event.job_id, event.request_id) == (
        alice.pk,
        "alice",
        "job",
        "j1",
        "r1",
    )


def test_deleting_a_user_keeps_their_events_and_the_chain(alice: User) -> None:
    audit.record(Action.AUTH_LOGIN, actor=alice)
    alice.delete()
    event = AuditEvent.objects.get()
    assert (event.actor_id, event.actor_name) == (None, "alice")
    assert verify_stored_chain().ok


def _launch_that_fails(team: Team) -> None:
    with audit.audited_transaction(
        Action.DEPLOYMENT_LAUNCH_REQUESTED, target=team, image="vllm/vllm-openai"
    ):
        audit.record(Action.GPU_RESERVED, gpus=[0, 1])
        Team.objects.filter(pk=team.pk).update(name="renamed inside the failed block")
        raise RuntimeError("docker said no")


def test_failed_action_is_recorded_after_the_rollback(team_a: Team) -> None:
    with pytest.raises(RuntimeError, match="docker said no"):
        _launch_that_fails(team_a)
    assert list(AuditEvent.objects.values_list("action", "outcome")) == [
        ("deployment.launch_requested", "failed")
    ]
    event = AuditEvent.objects.get()
    assert event.payload == {"error": "RuntimeError: docker said no", "image": "vllm/vllm-openai"}
    assert event.seq == 1
    team_a.refresh_from_db()
    assert team_a.name == "Team A"
    assert verify_stored_chain().ok


def test_failed_outcome_values_are_validated() -> None:
    with pytest.raises(ValueError, match="exploded"):
        audit.record(Action.GC_RAN, outcome="exploded")
    assert audit.record(Action.GC_RAN, outcome=Outcome.DENIED).outcome == "denied"
