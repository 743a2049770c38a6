"""Number formatting for pages: sizes in GiB, parameter counts in B/M."""

from __future__ import annotations

from django import template

register = template.Library()

GIB = 1024**3


@register.filter
def gib(value: int | None, digits: int = 1) -> str:
    """Bytes in binary units, labelled as such: ``140.0 GiB``, ``2.3 MiB``, ``1.5 KiB``,
    ``512 B``; a dash when unknown. (Django's ``filesizeformat`` divides by 1024 but writes
    "KB"/"MB".)"""
    if value is None or value == "":
        return "—"
    value = int(value)
    if value >= GIB:
        return f"{value / GIB:,.{digits}f} GiB"
    if value >= 1024**2:
        return f"{value / 1024**2:,.{digits}f} MiB"
    if value >= 1024:
        return f"{value / 1024:,.{digits}f} KiB"
    return f"{value:,} B"


@register.filter
def params(value: int | None) -> str:
    """A parameter count as people say it: ``70.6 B``, ``494 M``, ``12,345``."""
    if value is None or value == "":
        return "—"
    value = int(value)
    if value >= 10**9:
        return f"{value / 10**9:,.1f} B"
    if value >= 10**6:
        return f"{value / 10**6:,.0f} M"
    return f"{value:,}"


@register.filter
def mib_gib(value: int | None) -> str:
    """MiB (as NVML reports GPU memory) shown as GiB: ``79.6 GiB``."""
    if value is None or value == "":
        return "—"
    return gib(int(value) * 1024**2)
