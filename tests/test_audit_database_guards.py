"""Database guards of the audit trail: the PostgreSQL trigger, and concurrent appends on both
databases (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite)."""

from __future__ import annotations

import threading

import pytest
from django.db import DatabaseError, connection, connections, transaction

import audit
from accounts.models import User
from audit.actions import Action
from audit.models import AuditEvent
from audit.verification import verify_stored_chain

CONCURRENT_WRITERS = 20


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_auditevent SET actor_name = 'mallory'",
        "UPDATE audit_auditevent SET payload_json = '{}', actor_id = NULL",
        "DELETE FROM audit_auditevent WHERE seq = 1",
    ],
    ids=["update", "update-with-null-actor", "delete"],
)
def test_trigger_rejects_raw_update_and_delete(statement: str) -> None:
    audit.record(Action.GC_RAN, bytes_reclaimed=1)
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement)
    assert AuditEvent.objects.get().actor_name == "system"


@pytest.mark.postgres
@pytest.mark.django_db
def test_trigger_allows_only_clearing_the_actor_link_when_a_user_is_deleted(alice: User) -> None:
    audit.record(Action.AUTH_LOGIN, actor=alice)
    alice.delete()
    event = AuditEvent.objects.get()
    assert (event.actor_id, event.actor_name) == (None, "alice")
    assert verify_stored_chain().ok


@pytest.mark.django_db(transaction=True)
def test_concurrent_records_leave_an_unbroken_chain() -> None:
    start = threading.Barrier(CONCURRENT_WRITERS)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            start.wait()
            audit.record(Action.GC_RAN, writer=index)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=writer, args=(index,)) for index in range(CONCURRENT_WRITERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, CONCURRENT_WRITERS + 1))
    writers = sorted(event.payload["writer"] for event in AuditEvent.objects.all())
    assert writers == list(range(CONCURRENT_WRITERS))
    result = verify_stored_chain()
    assert (result.ok, result.checked) == (True, CONCURRENT_WRITERS)
