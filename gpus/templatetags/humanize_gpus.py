"""Template filters for GPU pages."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def mib(value: int | None) -> str:
    """``21453`` -> ``"21,453 MiB"`` (``"20.95 GiB"`` would hide the MiB nvidia-smi shows);
    None -> ``"?"``: unknown is shown as unknown."""
    if value is None:
        return "?"
    return f"{int(value):,} MiB"
