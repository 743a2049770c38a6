"""Template filters for GPU pages."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def mib(value: int | None) -> str:
    """GPU memory (MiB, as NVML reports it) for people: ``21453`` -> ``"21.0 GiB"``, below one
    GiB in MiB (``"512 MiB"``); None -> ``"?"``: unknown is shown as unknown."""
    if value is None:
        return "?"
    value = int(value)
    return f"{value / 1024:,.1f} GiB" if value >= 1024 else f"{value:,} MiB"


@register.filter
def mib_exact(value: int | None) -> str:
    """``21453`` -> ``"21,453 MiB"``: the figure nvidia-smi prints, to compare with it."""
    if value is None:
        return "?"
    return f"{int(value):,} MiB"
