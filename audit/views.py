"""The audit review: a filterable, keyset-paginated list of events for auditors and admins."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Callable, Iterator
from functools import wraps
from itertools import islice
from typing import Any
from urllib.parse import urlencode

import django_rq
from asgiref.sync import sync_to_async
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST
from redis.exceptions import RedisError

import audit
from audit import chain, filters
from audit.actions import Action, Outcome
from audit.jobs import verify_chain
from audit.models import AuditEvent
from audit.verification import job_state, latest_status
from core.queues import enqueue

# Events of the same request or job shown on an event's page (each one query, capped).
RELATED_LIMIT = 100
EXPORT_BATCH = 1000
EXPORT_FIELDS = (
    "seq",
    "time",
    "actor_name",
    "actor_kind",
    "team_slug",
    "action",
    "outcome",
    "target_type",
    "target_id",
    "target_repr",
    "request_id",
    "job_id",
    "client_ip",
    "payload_json",
    "prev_hash",
    "hash",
)
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def reviewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Auditors and admins only (403 otherwise). Duck-typed on the user model's role
    properties, because ``audit`` imports none of Berth's other apps."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not (getattr(user, "is_auditor", False) or getattr(user, "is_admin", False)):
            raise PermissionDenied("Only auditors and admins may read the audit trail.")
        return view(request, *args, **kwargs)

    return wrapped


@reviewer_required
def review(request: HttpRequest) -> HttpResponse:
    """Filtered events, newest first, one keyset page at a time. The query count is fixed:
    the page of events (plus two lookups for a time range) and the latest verification."""
    form = filters.parse(request.GET)
    events: list[AuditEvent] = []
    next_before = None
    if form.is_valid():
        matching = form.events()
        if form.before_seq is not None:
            matching = matching.filter(seq__lt=form.before_seq)
        events = list(matching[: form.page_size + 1])
        if len(events) > form.page_size:
            events = events[: form.page_size]
            next_before = events[-1].seq
    active = form.active() if form.is_valid() else {}
    context = {
        "form": form,
        "events": events,
        "filters": active,
        "next_before": next_before,
        "is_first_page": form.before_seq is None if form.is_valid() else True,
        "filter_valid": form.is_valid(),
        "export_query": urlencode(active),
    }
    if request.htmx:  # "Older events": the rows only
        return render(request, "audit/review.html#rows", context)
    context["verification"] = latest_status()
    # Invalid filters re-render the form with its errors (200, as a form page does); the
    # exports, read by programs, answer 400.
    return render(request, "audit/review.html", context)


@reviewer_required
def export(request: HttpRequest, fmt: str) -> HttpResponse:
    """The filtered events as CSV or JSON Lines, newest first, streamed in keyset batches (the
    export never holds more than one batch). The export is audited when it starts, with its
    filters: a stream cannot know its row count in advance."""
    form = filters.parse(request.GET)
    if not form.is_valid():
        errors = "; ".join(" ".join(messages_) for messages_ in form.errors.values())
        return HttpResponse(f"Bad filter: {errors}\n", status=400, content_type="text/plain")
    active = form.active()
    audit.record(Action.AUDIT_EXPORTED, format=fmt, filters=active)
    rows = _keyset_batches(form.events())
    if fmt == "csv":
        body = _csv_lines(rows)
        content_type = "text/csv; charset=utf-8"
    else:
        body = _jsonl_lines(rows)
        content_type = "application/x-ndjson; charset=utf-8"
    response = StreamingHttpResponse(_served(request, body), content_type=content_type)
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="berth-audit-{stamp}.{fmt}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _keyset_batches(events: QuerySet[AuditEvent]) -> Iterator[dict[str, Any]]:
    """Every row of ``events`` (ordered newest first), EXPORT_BATCH at a time by ``seq``."""
    before = None
    while True:
        batch = events if before is None else events.filter(seq__lt=before)
        rows = list(batch.values(*EXPORT_FIELDS)[:EXPORT_BATCH])
        yield from rows
        if len(rows) < EXPORT_BATCH:
            return
        before = rows[-1]["seq"]


def _served(request: HttpRequest, lines: Iterator[str]) -> Iterator[str] | AsyncIterator[str]:
    """The lines as the server needs them. Under ASGI (how Berth runs) Django would read a
    plain iterator into one list before sending anything, so the export is handed over as an
    async iterator that fetches each batch in the ORM's thread; under WSGI, as is."""
    if not isinstance(request, ASGIRequest):
        return lines
    return _async_chunks(lines)


async def _async_chunks(lines: Iterator[str]) -> AsyncIterator[str]:
    take = sync_to_async(_next_chunk, thread_sensitive=True)
    try:
        while chunk := await take(lines):
            yield chunk
    finally:
        await sync_to_async(_close, thread_sensitive=True)(lines)


def _next_chunk(lines: Iterator[str]) -> str:
    """Up to one export batch of lines, joined (one thread hop per batch, not per row)."""
    return "".join(islice(lines, EXPORT_BATCH))


def _close(lines: Iterator[str]) -> None:
    close = getattr(lines, "close", None)
    if close is not None:
        close()


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(EXPORT_FIELDS)
    for row in rows:
        row["time"] = chain.canonical_time(row["time"])
        yield writer.writerow([_csv_safe(row[name]) for name in EXPORT_FIELDS])


def _jsonl_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        row["time"] = chain.canonical_time(row["time"])
        row["payload"] = json.loads(row.pop("payload_json"))
        yield json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n"


@reviewer_required
def event_detail(request: HttpRequest, seq: int) -> HttpResponse:
    """One event with everything, and the other events of its request and of its job."""
    event = get_object_or_404(AuditEvent, seq=seq)
    payload = json.dumps(event.payload, indent=2, sort_keys=True)
    context = {
        "event": event,
        "payload": payload,
        "same_request": _related("request_id", event.request_id),
        "same_job": _related("job_id", event.job_id),
        "related_limit": RELATED_LIMIT,
    }
    return render(request, "audit/event.html", context)


def _related(field: str, value: str) -> list[AuditEvent]:
    """Up to RELATED_LIMIT + 1 events sharing ``field`` (the extra one says "more"), oldest
    first: one query on the (field, seq) index."""
    if not value:
        return []
    return list(AuditEvent.objects.filter(**{field: value}).order_by("seq")[: RELATED_LIMIT + 1])


@require_POST
@reviewer_required
def request_verification(request: HttpRequest) -> HttpResponse:
    """Queue a full verification of the chain; its result is itself an audit event. From the
    review page (htmx) the chain's badge is answered in place and follows the job until its
    result is recorded; without JavaScript, a message and the review page."""
    queue = django_rq.get_queue("default")
    try:
        queue.connection.ping()
        job_id = enqueue(queue, verify_chain, job_timeout=3600)
    except RedisError as exc:
        audit.record(Action.AUDIT_VERIFY_REQUESTED, outcome=Outcome.FAILED, error=str(exc)[:500])
        error = f"Could not queue the verification: Redis is unreachable ({exc})."
        if request.htmx:
            return _chain_status(request, error=error)
        messages.error(request, error)
        return redirect("audit-review")
    requested = audit.record(Action.AUDIT_VERIFY_REQUESTED, job_id_queued=job_id)
    if request.htmx:
        return _chain_status(request, after=requested.seq, job_id=job_id)
    messages.success(
        request,
        f"Verification queued as job {job_id}; its result appears below as 'Chain verified'.",
    )
    return redirect("audit-review")


@reviewer_required
def verification_status(request: HttpRequest) -> HttpResponse:
    """The chain's badge, polled while a requested verification runs: the result once an
    ``audit.verified`` newer than the request (``after``) exists, else the job's state."""
    try:
        after = int(request.GET.get("after", ""))
    except ValueError:
        return HttpResponse("after: a sequence number is required.\n", status=400)
    return _chain_status(request, after=after, job_id=request.GET.get("job", "")[:64])


def _chain_status(
    request: HttpRequest, *, after: int | None = None, job_id: str = "", error: str = ""
) -> HttpResponse:
    verification = latest_status()
    pending = None
    if after is not None and (verification.seq or 0) <= after:
        pending = {"after": after, "job_id": job_id, "state": job_state(job_id)}
    context = {"verification": verification, "pending": pending, "error": error}
    return render(request, "audit/review.html#chain", context)
