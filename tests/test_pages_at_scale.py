"""Pages that grow with the fleet stay bounded (the fixes benchmarks/pages_at_scale.py led to):
a GPU's history draws at most one point per pixel column however many readings there are,
and the deployments list shows a page at a time, in a fixed number of queries."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from deployments.models import Deployment
from deployments.states import State
from deployments.web.views import DEPLOYMENTS_PER_PAGE
from gpus import charts
from gpus.history import chart_rows
from gpus.models import GpuSnapshot
from tests.deployment_builders import engine_image, host_with_gpus, registered_model


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_downsample_keeps_each_columns_peak_and_the_last_reading() -> None:
    start = timezone.now()
    rows = [(start + timedelta(seconds=s), s % 7, None if s % 2 else s) for s in range(100)]
    reduced = charts.downsample(rows, start=start, end=start + timedelta(seconds=100), columns=10)
    assert len(reduced) == 11  # ten columns and the last reading
    assert reduced[0] == (rows[9][0], 6, 8)  # seconds 0-9: highest of each field, last time
    assert reduced[-1] == rows[-1]
    assert charts.downsample(rows[:5], start=start, end=start, columns=10) == rows[:5]
    only_unknown = [(start, None), (start + timedelta(seconds=1), None)]
    assert charts.downsample(only_unknown, start=start, end=start, columns=1)[0][1] is None


def test_the_database_keeps_each_columns_peak_and_counts_every_reading(db: None) -> None:
    gpu = host_with_gpus(count=1).gpus.get()
    now = timezone.now()
    GpuSnapshot.objects.bulk_create(
        GpuSnapshot(gpu=gpu, time=now - timedelta(seconds=5 * step), source="nvml",
                    memory_used_mib=90_000 if step == 500 else 1000, utilization_gpu_pct=None,
                    power_w=100.0 + step)
        for step in range(1, 1201)
    )  # fmt: skip
    rows, readings = chart_rows(gpu, start=now - timedelta(hours=2), end=now, columns=100)
    assert readings == 1200
    assert len(rows) <= 101
    assert max(row[1] for row in rows) == 90_000  # the spike survives the reduction
    assert all(row[3] is None for row in rows)  # unknown stays unknown, not zero
    assert rows[-1] == (now - timedelta(seconds=5), 1000, None, None, None, 101.0)  # the newest
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)


def test_a_day_of_history_draws_one_point_per_pixel_column(
    alice: User, django_assert_max_num_queries: Any
) -> None:
    host = host_with_gpus(count=1)
    gpu = host.gpus.get()
    now = timezone.now()
    GpuSnapshot.objects.bulk_create(
        GpuSnapshot(gpu=gpu, time=now - timedelta(seconds=5 * step), source="nvml",
                    memory_used_mib=1000 + step % 50, utilization_gpu_pct=step % 100)
        for step in range(1, 2 * 3600 // 5)
    )  # fmt: skip
    client = signed_in(alice)
    url = reverse("gpus-gpu", args=[host.name, 0]) + "?hours=6"
    client.get(url)
    with django_assert_max_num_queries(6):
        response = client.get(url)
    page = response.content.decode()
    assert "1,439 readings" in page or "1439 readings" in page
    polylines = re.findall(r'points="([^"]*)"', page)
    assert polylines
    assert all(len(points.split()) <= charts.CHART_WIDTH + 1 for points in polylines)


def test_the_deployments_list_shows_a_page_at_a_time_in_fixed_queries(
    admin: User, team_a: Any, tmp_path: Any, django_assert_max_num_queries: Any
) -> None:
    model = registered_model(team_a, tmp_path)
    host = host_with_gpus(count=1)
    image = engine_image()
    total = 2 * DEPLOYMENTS_PER_PAGE + 7
    Deployment.objects.bulk_create(
        Deployment(name=f"dep-{n:03d}", team=team_a, model=model, host=host, image=image,
                   gpu_count=1, state=State.STOPPED)
        for n in range(total)
    )  # fmt: skip
    client = signed_in(admin)
    url = reverse("deployments-index")
    for page, rows in ((1, DEPLOYMENTS_PER_PAGE), (3, 7)):
        with django_assert_max_num_queries(8):
            response = client.get(url, {"page": page})
        html = response.content.decode()
        assert html.count('class="state state-') == rows
        assert f"Page {page} of 3 ({total} deployments)" in html
    assert 'rel="next"' in client.get(url).content.decode()
    assert client.get(url, {"page": "x"}).status_code == 200  # a bad page number shows page 1
