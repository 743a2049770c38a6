"""Audit review for auditors and admins: filters, keyset pages, event detail with its request and
job, streamed exports, the chain's verification status and schedule, and retention (prune)."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import audit
from accounts.models import Team, User
from agent.scheduler import PeriodicJobs
from audit import views
from audit.actions import Action, Outcome, grouped_choices
from audit.jobs import FIRST_RUN_AFTER_S, scheduled_verification
from audit.models import AppendOnlyError, AuditEvent
from audit.retention import PruneRefused, prune_before
from audit.trail import Target
from audit.verification import latest_status, verify_and_record, verify_stored_chain
from core import context
from core.queues import get_queue
from gpus.models import Host
from tests.conftest import run_manage, subprocess_env

pytestmark = pytest.mark.django_db


def _client(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _seqs(html: str) -> list[int]:
    return [
        int(seq) for seq in re.findall(r'<td data-label="#"><a href="/audit/events/(\d+)/">', html)
    ]


@pytest.fixture
def trail(alice: User, bob: User, team_a: Team, team_b: Team) -> dict[str, AuditEvent]:
    """A small, varied trail: one event per distinguishing value."""
    events = {}
    with context.bind(request_id="req-1"):
        events["login"] = audit.record(Action.AUTH_LOGIN, actor=alice)
        events["reserve"] = audit.record(
            Action.GPU_RESERVED, actor=alice, team=team_a, target=Target("gpu", "7", "gpu 7")
        )
    with context.bind(job_id="job-1", actor_kind="job"):
        events["gc"] = audit.record(Action.GC_RAN, bytes_reclaimed=1)
        events["gc_failed"] = audit.record(Action.GC_RAN, outcome=Outcome.FAILED, error="disk")
    events["denied"] = audit.record(
        Action.DEPLOYMENT_LAUNCH_REQUESTED, actor=bob, team=team_b, outcome=Outcome.DENIED
    )
    return events


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("action=gc.ran", {"gc", "gc_failed"}),
        ("actor=alice", {"login", "reserve"}),
        ("kind=job", {"gc", "gc_failed"}),
        ("team=team-b", {"denied"}),
        ("outcome=failed", {"gc_failed"}),
        ("target_type=gpu&target_id=7", {"reserve"}),
        ("target_id=8", set()),
        ("request=req-1", {"login", "reserve"}),
        ("job=job-1", {"gc", "gc_failed"}),
        ("action=gc.ran&outcome=ok", {"gc"}),
        ("actor=alice&team=team-a&request=req-1", {"reserve"}),
    ],
)
def test_each_filter_and_combinations(
    carol: User, trail: dict[str, AuditEvent], query: str, expected: set[str]
) -> None:
    response = _client(carol).get(f"/audit/?{query}")
    assert response.status_code == 200
    by_seq = {event.seq: name for name, event in trail.items()}
    shown = {by_seq[seq] for seq in _seqs(response.content.decode()) if seq in by_seq}
    assert shown == expected


def test_time_range_accepts_datetime_local_and_iso_8601(carol: User) -> None:
    events = [audit.record(Action.GC_RAN, step=index) for index in range(5)]
    client = _client(carol)
    since, until = events[1].time.isoformat(), events[3].time.isoformat()
    html = client.get("/audit/", {"since": since, "until": until}).content.decode()
    assert _seqs(html) == [events[2].seq, events[1].seq]  # from inclusive, until exclusive
    # What <input type="datetime-local"> sends: minutes, no offset (read as UTC).
    minute = (events[0].time - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    assert len(_seqs(client.get("/audit/", {"since": minute}).content.decode())) >= 5
    future = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert _seqs(client.get("/audit/", {"since": future}).content.decode()) == []
    offset = events[4].time.astimezone(timezone.get_fixed_timezone(120)).isoformat()
    assert _seqs(client.get("/audit/", {"since": offset}).content.decode())[-1] == events[4].seq


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("since=yesterday", "From: enter a date and time in UTC"),
        ("until=2026-13-45T99:99", "Until: enter a date and time in UTC"),
        ("since=2026-02-01T00:00&until=2026-01-01T00:00", "Until: must be later than From."),
        ("action=audit.invented", "Action: audit.invented is not one of the choices"),
        ("outcome=maybe", "Outcome: maybe is not one of the choices"),
        ("size=5000", "Per page: must be at most 200."),
        ("before=abc", "Before sequence: enter a whole number."),
        ("actor=" + "x" * 151, "Actor: at most 150 characters."),
    ],
)
def test_bad_filter_values_name_the_field_and_do_not_crash(
    carol: User, query: str, message: str
) -> None:
    audit.record(Action.GC_RAN)
    response = _client(carol).get(f"/audit/?{query}")
    assert response.status_code == 200  # the form again, with the error beside its field
    html = response.content.decode()
    assert message in html
    assert 'name="since"' in html
    assert "Correct the filter above" in html
    assert "/audit/export.csv" not in html
    export = _client(carol).get(f"/audit/export.csv?{query}")
    assert export.status_code == 400
    assert message in export.content.decode()


def test_keyset_pages_cover_the_filtered_set_without_overlap(carol: User) -> None:
    for index in range(57):
        audit.record(Action.GC_RAN if index % 3 else Action.GPU_RESERVED, index=index)
    client = _client(carol)
    pages, before = [], None
    while True:
        query = {"action": "gc.ran", "size": 10, **({"before": before} if before else {})}
        html = client.get("/audit/", query).content.decode()
        pages.append(_seqs(html))
        match = re.search(r"before=(\d+)", html.split('id="more-row"')[-1])
        if 'id="more-row"' not in html:
            break
        before = int(match.group(1))
    seen = [seq for page in pages for seq in page]
    expected = list(
        AuditEvent.objects.filter(action="gc.ran").order_by("-seq").values_list("seq", flat=True)
    )
    assert seen == expected
    assert len(set(seen)) == len(seen) == 38
    assert all(len(page) == 10 for page in pages[:-1])


def test_query_count_does_not_grow_with_page_size(carol: User) -> None:
    for index in range(210):
        audit.record(Action.GC_RAN, index=index)
    client = _client(carol)
    client.get("/audit/")  # warm the session
    counts = {}
    for size in (10, 200):
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/audit/", {"size": size, "since": "2000-01-01T00:00"})
        assert len(_seqs(response.content.decode())) == size
        counts[size] = len(queries)
    assert counts[10] == counts[200], counts
    assert 3 <= counts[10] <= 8, counts


def test_event_detail_lists_the_other_events_of_its_request_and_job(
    carol: User, trail: dict[str, AuditEvent]
) -> None:
    html = _client(carol).get(f"/audit/events/{trail['reserve'].seq}/").content.decode()
    assert 'id="same-request"' in html
    assert f'href="/audit/events/{trail["login"].seq}/"' in html
    assert "(this event)" in html
    assert f'href="/audit/events/{trail["gc"].seq}/"' not in html
    assert 'id="same-job"' not in html
    job_html = _client(carol).get(f"/audit/events/{trail['gc'].seq}/").content.decode()
    assert f'href="/audit/events/{trail["gc_failed"].seq}/"' in job_html
    assert "gpu 7" in html
    assert "&quot;error&quot;" not in html


def test_event_detail_caps_related_events_and_links_to_the_rest(carol: User) -> None:
    with context.bind(request_id="busy"):
        first = audit.record(Action.GC_RAN, index=0)
        for index in range(views.RELATED_LIMIT + 4):
            audit.record(Action.GC_RAN, index=index + 1)
    client = _client(carol)
    with CaptureQueriesContext(connection) as queries:
        html = client.get(f"/audit/events/{first.seq}/").content.decode()
    assert html.count('<td data-label="#"><a href="/audit/events/') == views.RELATED_LIMIT - 1
    assert "/audit/?request=busy" in html
    assert 3 <= len(queries) <= 6


def _stream(response) -> str:
    assert response.streaming
    return b"".join(response.streaming_content).decode()


def test_csv_export_streams_the_filtered_set_in_batches_and_is_injection_safe(
    carol: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "EXPORT_BATCH", 3)
    for index, name in enumerate(["=HYPERLINK(x)", "+1", "-2", "@sum", "\tx", "plain", "ok"]):
        audit.record(Action.GC_RAN, target=Target("disk", str(index), name), index=index)
    audit.record(Action.GPU_RESERVED)
    client = _client(carol)
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/audit/export.csv", {"action": "gc.ran"})
        body = _stream(response)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="berth-audit-\d{8}T\d{6}Z\.csv"', response["Content-Disposition"]
    )
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [row["seq"] for row in rows] == ["7", "6", "5", "4", "3", "2", "1"]
    reprs = [row["target_repr"] for row in rows]
    assert reprs == ["ok", "plain", "'\tx", "'@sum", "'-2", "'+1", "'=HYPERLINK(x)"]
    assert json.loads(rows[0]["payload_json"]) == {"index": 6}
    keyset = [q["sql"] for q in queries if "audit_auditevent" in q["sql"] and "LIMIT 3" in q["sql"]]
    assert len(keyset) == 3
    assert all("OFFSET" not in sql for sql in keyset)
    exported = AuditEvent.objects.get(action="audit.exported")
    assert (exported.actor_name, exported.payload) == (
        "carol",
        {"format": "csv", "filters": {"action": "gc.ran"}},
    )


def test_export_under_asgi_streams_batch_by_batch(
    carol: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ASGI (how Berth is served) Django would buffer a plain iterator whole; the export
    hands over an async iterator instead, one batch per chunk."""
    monkeypatch.setattr(views, "EXPORT_BATCH", 3)
    for index in range(7):
        audit.record(Action.GC_RAN, index=index)

    @async_to_sync
    async def first_chunks() -> tuple[bool, list[bytes]]:
        client = AsyncClient()
        await client.aforce_login(carol)
        response = await client.get("/audit/export.jsonl", {"action": "gc.ran"})
        chunks = [chunk async for chunk in response.streaming_content]
        return response.is_async, chunks

    is_async, chunks = first_chunks()
    assert is_async
    assert [chunk.count(b"\n") for chunk in chunks] == [3, 3, 1]
    seqs = [json.loads(line)["seq"] for line in b"".join(chunks).splitlines()]
    assert seqs == [7, 6, 5, 4, 3, 2, 1]


def test_jsonl_export_has_one_object_per_event_with_its_payload(
    carol: User, trail: dict[str, AuditEvent]
) -> None:
    response = _client(carol).get("/audit/export.jsonl", {"request": "req-1"})
    assert response["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert response["Content-Disposition"].endswith('.jsonl"')
    lines = [json.loads(line) for line in _stream(response).splitlines()]
    assert [line["seq"] for line in lines] == [trail["reserve"].seq, trail["login"].seq]
    assert lines[0]["target_repr"] == "gpu 7"
    assert lines[0]["hash"] == trail["reserve"].hash
    assert isinstance(lines[0]["payload"], dict)


def test_review_page_links_to_both_exports_with_the_current_filters(carol: User) -> None:
    audit.record(Action.GC_RAN)
    html = _client(carol).get("/audit/?action=gc.ran&outcome=ok&size=10").content.decode()
    assert 'href="/audit/export.csv?action=gc.ran&amp;outcome=ok"' in html
    assert 'href="/audit/export.jsonl?action=gc.ran&amp;outcome=ok"' in html


@pytest.mark.parametrize("url", ["/audit/export.csv", "/audit/export.jsonl"])
def test_export_permission_matrix(people: dict[str, User | None], url: str) -> None:
    expected = {"alice": 403, "bob": 403, "carol": 200, "admin": 200, "anonymous": 302}
    for name, status in expected.items():
        response = _client(people[name]).get(url)
        assert response.status_code == status, name
        if name == "anonymous":
            assert response["Location"].startswith("/accounts/login/")
    assert AuditEvent.objects.filter(action="audit.exported").count() == 2


def test_verification_badge_never_verified_broken(carol: User) -> None:
    client = _client(carol)
    assert "Never verified" in client.get("/audit/").content.decode()
    audit.record(Action.GC_RAN)
    verify_and_record()
    html = client.get("/audit/").content.decode()
    assert ">Verified</span>" in html
    assert re.search(r"\d+ events intact up to #\d+", html)
    assert latest_status(now=timezone.now() + timedelta(days=2)).state == "stale"
    _tamper_with(2)
    verify_and_record()
    html = client.get("/audit/").content.decode()
    assert ">Broken</span>" in html
    assert "broken at sequence <strong>2</strong>" in html


def _tamper_with(seq: int) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq = %s", [seq])
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")


@pytest.mark.redis
def test_periodic_verification_is_booked_once_per_interval_and_skips_a_fresh_result(
    settings, periodic_claims, django_capture_on_commit_callbacks
) -> None:
    settings.BERTH_AUDIT_VERIFY_INTERVAL_H = 6
    queue = get_queue("default")
    queue.empty()
    clock = [0.0]
    first_agent = PeriodicJobs(Host.objects.create(name="agent-a"), clock=lambda: clock[0])
    second_agent = PeriodicJobs(Host.objects.create(name="agent-b"), clock=lambda: clock[0])
    with django_capture_on_commit_callbacks(execute=True):
        assert not _verification(first_agent.tick() + second_agent.tick())  # just started
        clock[0] = FIRST_RUN_AFTER_S
        assert _verification(first_agent.tick())
        assert not _verification(second_agent.tick())  # claimed by the first agent
    assert [job.func for job in queue.jobs].count(scheduled_verification) == 1
    queue.empty()

    audit.record(Action.GC_RAN)
    assert scheduled_verification()["ok"] is True
    verified = AuditEvent.objects.get(action="audit.verified")
    assert (verified.outcome, verified.payload["scheduled"]) == ("ok", True)
    assert scheduled_verification() is None  # verified moments ago: nothing to do
    _tamper_with(1)
    later = timezone.now() + timedelta(hours=4)
    assert scheduled_verification(now=later)["first_bad_seq"] == 1
    settings.BERTH_AUDIT_VERIFY_INTERVAL_H = 0
    clock[0] += settings.BERTH_AUDIT_VERIFY_INTERVAL_H * 3600
    with django_capture_on_commit_callbacks(execute=True):
        assert not _verification(first_agent.tick())


def _verification(names: list[str]) -> bool:
    return any(name.endswith(".scheduled_verification") for name in names)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_an_agent_books_the_verification_and_the_default_worker_runs_it(periodic_claims) -> None:
    audit.record(Action.GC_RAN)
    queue = get_queue("default")
    queue.empty()
    clock = [0.0]
    agent = PeriodicJobs(Host.objects.create(name="verifier"), clock=lambda: clock[0])
    agent.tick()
    clock[0] = FIRST_RUN_AFTER_S
    assert _verification(agent.tick())
    worker = run_manage("berth_worker", "default", "--burst", env=subprocess_env())
    assert worker.returncode == 0, worker.stdout + worker.stderr
    verified = AuditEvent.objects.get(action="audit.verified")
    assert (verified.outcome, verified.actor_kind, verified.payload["scheduled"]) == (
        "ok",
        "job",
        True,
    )


# --- retention ---------------------------------------------------------------------------------


def test_prune_refuses_unless_retention_is_configured_or_forced(settings) -> None:
    events = [audit.record(Action.GC_RAN, step=index) for index in range(3)]
    settings.BERTH_AUDIT_RETENTION_DAYS = 0
    with pytest.raises(CommandError, match="kept forever: BERTH_AUDIT_RETENTION_DAYS is 0"):
        call_command("prune_audit", "--older-than-days", "30")
    settings.BERTH_AUDIT_RETENTION_DAYS = 90
    with pytest.raises(CommandError, match="more recent than the configured retention of 90"):
        call_command("prune_audit", "--older-than-days", "30")
    with pytest.raises(CommandError, match="--before 'last week': use a date"):
        call_command("prune_audit", "--before", "last week", "--force")
    out = io.StringIO()
    call_command("prune_audit", stdout=out)  # the configured 90 days: nothing that old
    assert "no audit events older than" in out.getvalue()
    assert AuditEvent.objects.count() == len(events)


def test_prune_checkpoints_then_deletes_and_the_chain_still_verifies() -> None:
    events = [audit.record(Action.GC_RAN, step=index) for index in range(6)]
    out = io.StringIO()
    call_command("prune_audit", "--before", events[3].time.isoformat(), "--force", stdout=out)
    assert "pruned 3 audit events through sequence 3" in out.getvalue()
    assert list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True)) == [4, 5, 6, 7]
    checkpoint = AuditEvent.objects.get(action="audit.pruned")
    assert checkpoint.payload["through_seq"] == 3
    assert checkpoint.payload["through_hash"] == events[2].hash
    assert checkpoint.payload["deleted"] == 3
    assert checkpoint.payload["forced"] is True
    result = verify_stored_chain()
    assert result.ok
    assert result.checked == 4
    out = io.StringIO()
    call_command("audit_verify", stdout=out)
    assert "audit chain intact: 4 events" in out.getvalue()
    assert "from the prune checkpoint after sequence 3" in out.getvalue()

    # A second prune removes the first checkpoint too; the newest checkpoint explains the gap.
    later = audit.record(Action.GC_RAN)
    prune_before(later.time)
    assert AuditEvent.objects.order_by("seq").first().seq == later.seq
    assert verify_stored_chain().ok


def test_prune_refuses_a_broken_chain_and_keeping_no_head() -> None:
    events = [audit.record(Action.GC_RAN, step=index) for index in range(4)]
    with pytest.raises(PruneRefused, match="newest one must stay"):
        prune_before(timezone.now() + timedelta(days=1))
    _tamper_with(2)
    with pytest.raises(PruneRefused, match="broken at sequence 2"):
        prune_before(events[3].time)
    assert AuditEvent.objects.count() == 4
    assert not AuditEvent.objects.filter(action="audit.pruned").exists()


def test_a_missing_head_without_a_checkpoint_is_still_tampering() -> None:
    [audit.record(Action.GC_RAN, step=index) for index in range(3)]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("DELETE FROM audit_auditevent WHERE seq = 1")
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = origin")
    result = verify_stored_chain()
    assert (result.ok, result.first_bad_seq) == (False, 1)


def test_ordinary_deletes_are_still_refused_after_a_prune() -> None:
    events = [audit.record(Action.GC_RAN, step=index) for index in range(4)]
    prune_before(events[2].time)
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(seq=events[3].seq).delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.get(seq=events[3].seq).delete()
    if connection.vendor == "postgresql":
        # The trigger's escape covers the prune's own transaction only, and only its rows.
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute("DELETE FROM audit_auditevent WHERE seq = %s", [events[3].seq])
        with transaction.atomic(), connection.cursor() as cursor:
            # Even a hand-set escape covers only rows at or below its seq.
            cursor.execute("SELECT set_config('berth.audit_prune_through', '2', true)")
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
                cursor.execute("DELETE FROM audit_auditevent WHERE seq = %s", [events[3].seq])
    assert AuditEvent.objects.filter(seq=events[3].seq).exists()


@pytest.mark.postgres
def test_a_hand_set_escape_without_its_checkpoint_deletes_nothing() -> None:
    """The escape setting is a plain session setting anyone can set to any value: without the
    audit.pruned checkpoint that names it, newer than the rows, the trigger refuses. Otherwise
    the newest events could be cut off, and a chain cut at its tail still verifies."""
    events = [audit.record(Action.GC_RAN, step=index) for index in range(4)]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('berth.audit_prune_through', '999999999', true)")
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            cursor.execute("DELETE FROM audit_auditevent WHERE seq >= %s", [events[2].seq])
        # Naming an existing seq is not enough either: no checkpoint recorded it.
        cursor.execute(
            "SELECT set_config('berth.audit_prune_through', %s, true)", [str(events[1].seq)]
        )
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            cursor.execute("DELETE FROM audit_auditevent WHERE seq <= %s", [events[1].seq])
    assert AuditEvent.objects.count() == 4
    assert verify_stored_chain().ok


def test_the_action_filter_groups_every_action_by_subject_with_readable_labels(
    carol: User,
) -> None:
    html = _client(carol).get("/audit/").content.decode()
    groups = re.findall(r'<optgroup label="([^"]+)">', html)
    assert groups[:2] == ["Sign-in", "Accounts and teams"]
    assert len(groups) == len(set(groups))
    assert "Other" not in groups  # every prefix has its subject in audit.actions.SUBJECTS
    grouped = [value for _subject, choices in grouped_choices() for value, _label in choices]
    assert sorted(grouped) == sorted(Action.values)  # every action, once
    assert '<option value="deployment.state_changed">Deployment state changed</option>' in html


def test_the_review_list_shows_a_state_change_as_old_to_new(carol: User, team_a: Team) -> None:
    target = Target("deployment", "1", "team-a/tiny")
    audit.record(Action.DEPLOYMENT_STATE_CHANGED, target=target, team=team_a, old="loading",
                 new="failed", outcome=Outcome.FAILED)  # fmt: skip
    html = _client(carol).get("/audit/?outcome=failed").content.decode()
    assert "Deployment state changed" in html
    assert "loading → failed" in html
