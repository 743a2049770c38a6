"""Numbers people compare, drawn: memory bars and history lines as plain SVG coordinates.

Pure functions; templates put the results in SVG attributes (the CSP allows no inline styles,
so widths are SVG geometry, colours are CSS classes)::

    bar = memory_bar(total=81559, berth=0, foreign=21453, free=59627)   # percentages
    line = history_line([(t0, 12.0), (t1, 40.0)], start=t0, end=t1, y_max=100)
    rows = downsample(rows, start=t0, end=t1)   # at most one row per pixel column
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


def downsample(
    rows: Sequence[tuple[Any, ...]], *, start: datetime, end: datetime, columns: int = CHART_WIDTH
) -> list[tuple[Any, ...]]:
    """At most one row per pixel column of the chart (plus the last reading), so a day of
    5-second readings (17,280 rows) draws 600 points, not 86,400 (benchmarks/pages_at_scale.py).
    ``rows`` are (time, value, ...) in time order; each column keeps the highest value of every
    field (a spike must stay visible), at the time of its last row; None only when every row
    in the column is None. The very last reading is kept as it is, for the "latest" labels."""
    if len(rows) <= columns:
        return list(rows)
    span = max((end - start).total_seconds(), 1.0)
    buckets: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        column = min(int((row[0] - start).total_seconds() / span * columns), columns - 1)
        buckets.setdefault(column, []).append(row)
    reduced = [_highest(group) for _, group in sorted(buckets.items())]
    if len(buckets[max(buckets)]) > 1:
        reduced.append(rows[-1])
    return reduced


def _highest(group: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    fields = zip(*(row[1:] for row in group), strict=True)
    peaks = [max((v for v in values if v is not None), default=None) for values in fields]
    return (group[-1][0], *peaks)
