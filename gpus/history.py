"""A GPU's history as chart rows: reduced by the database to one row per pixel column.

A day of 5-second readings is 17,280 rows per GPU (86,400 / 5); moving them all into
Python to draw a 600-pixel chart cost most of the page's time (benchmarks/pages_at_scale.py).
The database groups the window into ``columns`` equal time buckets and keeps each field's
highest value per bucket, so a spike stays visible::

    rows, readings = chart_rows(gpu, start=now - timedelta(hours=24), end=now)
    # rows: [(time, memory_used_mib, memory_foreign_mib, utilization_gpu_pct, temperature_c,
    #         power_w), ...]  at most columns + 1 of them; readings: 17280
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connections
from django.db.models import Count, Max
from django.db.models.expressions import RawSQL

from gpus import charts
from gpus.models import Gpu, GpuSnapshot

FIELDS = (
    "memory_used_mib",
    "memory_foreign_mib",
    "utilization_gpu_pct",
    "temperature_c",
    "power_w",
)
# The bucket of a snapshot's time: seconds since an epoch divided by the bucket width.
BUCKET_SQL = {
    "sqlite": 'CAST(julianday("gpus_gpusnapshot"."time") * 86400.0 / %s AS INTEGER)',
    "postgresql": 'FLOOR(EXTRACT(EPOCH FROM "gpus_gpusnapshot"."time") / %s)',
}


def chart_rows(
    gpu: Gpu, *, start: datetime, end: datetime, columns: int = charts.CHART_WIDTH
) -> tuple[list[tuple[Any, ...]], int]:
    """(time, *FIELDS) rows for a chart ``columns`` pixels wide: per bucket the time of its
    newest reading and each field's highest value, then the newest reading itself (for the
    "latest" labels); and how many readings the window holds."""
    snapshots = GpuSnapshot.objects.filter(gpu=gpu, time__gte=start)
    sql = BUCKET_SQL.get(connections[snapshots.db].vendor)
    if sql is None:  # another database: the same reduction in Python
        rows = list(snapshots.order_by("time").values_list("time", *FIELDS))
        return charts.downsample(rows, start=start, end=end, columns=columns), len(rows)
    width_s = max((end - start).total_seconds() / columns, 1.0)
    bucket = RawSQL(sql, (width_s,))  # noqa: S611 - constant SQL; the width is a bound parameter
    buckets = list(
        snapshots.annotate(bucket=bucket)
        .values("bucket")
        .annotate(newest=Max("time"), readings=Count("id"), **{f"peak_{f}": Max(f) for f in FIELDS})
        .order_by("bucket")
    )
    rows = [(b["newest"], *(b[f"peak_{f}"] for f in FIELDS)) for b in buckets]
    if buckets and buckets[-1]["readings"] > 1:
        rows.append(snapshots.order_by("-time").values_list("time", *FIELDS).first())
    return rows, sum(b["readings"] for b in buckets)
