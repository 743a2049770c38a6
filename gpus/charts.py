"""Numbers people compare, drawn: memory bars and history lines as plain SVG coordinates.

Pure functions; templates put the results in SVG attributes (the CSP allows no inline styles,
so widths are SVG geometry, colours are CSS classes)::

    bar = memory_bar(total=81559, berth=0, foreign=21453, free=59627)   # percentages
    line = history_line([(t0, 12.0), (t1, 40.0)], start=t0, end=t1, y_max=100)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

CHART_WIDTH = 600
CHART_HEIGHT = 120


@dataclass(frozen=True)
class MemoryBar:
    """Widths in percent of total memory: Berth deployments, foreign processes, free."""

    berth: float
    foreign: float
    free: float
    known: bool

    @property
    def foreign_x(self) -> float:
        return self.berth

    @property
    def free_x(self) -> float:
        return round(self.berth + self.foreign, 2)


def memory_bar(
    total: int | None, berth: int | None, foreign: int | None, free: int | None
) -> MemoryBar:
    """The split of one GPU's memory. Driver-reserved memory (total - used - free) is left
    undrawn at the end of the bar. Unknown totals draw nothing rather than a guess."""
    if not total or foreign is None:
        return MemoryBar(0, 0, 0, known=False)

    def pct(value: int | None) -> float:
        return round(max(min((value or 0) / total, 1.0), 0.0) * 100, 2)

    return MemoryBar(pct(berth), pct(foreign), pct(free), known=True)


@dataclass(frozen=True)
class Line:
    """An SVG polyline's ``points`` and the labels of its axes."""

    points: str
    y_max: float
    latest: float | None
    count: int


def history_line(
    samples: list[tuple[datetime, float | None]], *, start: datetime, end: datetime, y_max: float
) -> Line:
    """Map (time, value) samples into a CHART_WIDTH x CHART_HEIGHT box; None values (unknown)
    are skipped, not drawn as zero."""
    span = max((end - start).total_seconds(), 1.0)
    top = y_max if y_max > 0 else 1.0
    points = []
    latest = None
    for time, value in samples:
        if value is None:
            continue
        x = (time - start).total_seconds() / span * CHART_WIDTH
        y = CHART_HEIGHT - min(max(value / top, 0.0), 1.0) * CHART_HEIGHT
        points.append(f"{x:.1f},{y:.1f}")
        latest = value
    return Line(" ".join(points), y_max, latest, len(points))
