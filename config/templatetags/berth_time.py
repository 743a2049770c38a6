"""Times on pages, relative and absolute together, and the progress of a deployment's load.

::

    {% load berth_time %}
    {% when event.time %}                      → "12 s ago (09:30:05 UTC)"
    {% for event, offset in events|with_offsets %}{{ offset }}{% endfor %}   → "+4.2 s"
    {% with progress=deployment|load_progress:events %}...{% endwith %}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()

MINUTE, HOUR, DAY = 60, 3600, 86400
LOADING_STATES = ("queued", "launching", "loading")


def relative(value: datetime, now: datetime | None = None) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 days ago`` (``in …`` for the future)."""
    seconds = ((now or timezone.now()) - value).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    if seconds < MINUTE:
        text = f"{int(seconds)} s"
    elif seconds < HOUR:
        text = f"{int(seconds // MINUTE)} min"
    elif seconds < DAY:
        text = f"{int(seconds // HOUR)} h"
    else:
        days = int(seconds // DAY)
        text = f"{days} day{'s' if days != 1 else ''}"
    return f"in {text}" if future else f"{text} ago"


def absolute(value: datetime, now: datetime | None = None) -> str:
    """The time in the display time zone; the date too unless it is today."""
    local = timezone.localtime(value)
    today = timezone.localtime(now or timezone.now()).date()
    zone = local.tzname() or ""
    if local.date() == today:
        return f"{local:%H:%M:%S} {zone}".strip()
    return f"{local:%Y-%m-%d %H:%M} {zone}".strip()


@register.simple_tag
def when(value: datetime | None) -> str:
    """``<time>`` showing the relative time with the absolute one beside it."""
    if value is None:
        return "—"
    return format_html(
        '<time datetime="{}" title="{}">{}</time> <span class="abs-time">({})</span>',
        value.isoformat(),
        timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z"),
        relative(value),
        absolute(value),
    )


@register.filter
def with_offsets(events: Iterable[Any]) -> list[tuple[Any, str]]:
    """Each event with its offset from the first one (``+0.0 s``, ``+4.2 s``, ``+2 min 5 s``)."""
    rows = list(events)
    if not rows:
        return []
    start = rows[0].time
    return [(event, _offset((event.time - start).total_seconds())) for event in rows]


def _offset(seconds: float) -> str:
    if seconds < MINUTE:
        return f"+{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), MINUTE)
    return f"+{minutes} min {rest} s"


@dataclass(frozen=True)
class LoadProgress:
    """What the page says while a deployment starts: how long, of how long expected."""

    state: str
    elapsed_s: int
    expected_s: int | None
    percent: int | None
    last_step: str
    quiet_s: int | None
    stall_timeout_s: int


@register.filter
def load_progress(deployment: Any, events: Iterable[Any] = ()) -> LoadProgress | None:
    """The load's progress while the deployment is queued, launching or loading, else None.
    The expected time is the plan's estimate; without one (a CPU engine) there is no bar."""
    if deployment.state not in LOADING_STATES:
        return None
    rows = list(events)
    now = timezone.now()
    started = rows[0].time if rows else deployment.created
    elapsed = max(int((now - started).total_seconds()), 0)
    expected = ((deployment.plan or {}).get("startup") or {}).get("total_s")
    percent = min(int(elapsed * 100 / expected), 99) if expected else None
    progress = [event for event in rows if event.kind == "progress"]
    last = progress[-1] if progress else (rows[-1] if rows else None)
    quiet = None
    if deployment.last_progress_at is not None:
        quiet = max(int((now - deployment.last_progress_at).total_seconds()), 0)
    return LoadProgress(
        state=deployment.state,
        elapsed_s=elapsed,
        expected_s=int(expected) if expected else None,
        percent=percent,
        last_step=last.message if last is not None else "waiting for the host's worker",
        quiet_s=quiet,
        stall_timeout_s=deployment.stall_timeout_s,
    )


@register.filter
def duration_since(later: datetime | None, earlier: datetime | None) -> str:
    """``4.3 s``, ``2 min 5 s``: how long from ``earlier`` to ``later`` (empty when unknown)."""
    if later is None or earlier is None:
        return ""
    return _offset(max((later - earlier).total_seconds(), 0.0)).removeprefix("+")
