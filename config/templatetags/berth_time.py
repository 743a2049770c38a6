"""Times on pages, relative and absolute together.

::

    {% load berth_time %}
    {% when event.time %}                      → "12 s ago (09:30:05 UTC)"
    {% for event, offset in events|with_offsets %}{{ offset }}{% endfor %}   → "+4.2 s"
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()

MINUTE, HOUR, DAY = 60, 3600, 86400


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


@register.filter
def duration_since(later: datetime | None, earlier: datetime | None) -> str:
    """``4.3 s``, ``2 min 5 s``: how long from ``earlier`` to ``later`` (empty when unknown)."""
    if later is None or earlier is None:
        return ""
    return _offset(max((later - earlier).total_seconds(), 0.0)).removeprefix("+")
