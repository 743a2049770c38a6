"""GPU pages: every host's GPUs, one host's dashboard (refreshed by htmx), one GPU's history.

Hosts are shared infrastructure: every member sees them (placement is per team, the hardware
is not); auditors read the audit trail only.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from accounts.access import role_required
from accounts.models import Role
from gpus import charts
from gpus.history import chart_rows
from gpus.inventory import stale_after
from gpus.models import Gpu, Host

HISTORY_WINDOWS_H = (1, 6, 24, 168)
DEFAULT_WINDOW_H = 6


def _present_gpus() -> Prefetch:
    return Prefetch("gpus", queryset=Gpu.objects.filter(present=True).order_by("index"))


def _decorate(gpu: Gpu, now) -> Gpu:
    gpu.bar = charts.memory_bar(
        gpu.memory_total_mib, gpu.memory_berth_mib, gpu.memory_foreign_mib, gpu.memory_free_mib
    )
    gpu.stale = gpu.seen_at is None or now - gpu.seen_at > stale_after()
    return gpu


def _host_context(host: Host, now) -> Host:
    host.display_state = host.state(now)
    host.present_gpus = [_decorate(gpu, now) for gpu in host.gpus.all()]
    return host


@role_required(Role.MEMBER)
def index(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    hosts = [_host_context(host, now) for host in Host.objects.prefetch_related(_present_gpus())]
    context = {"hosts": hosts, "now": now, "refresh_s": settings.BERTH_AGENT_INTERVAL_S}
    if request.htmx:
        return render(request, "gpus/index.html#hosts", context)
    return render(request, "gpus/index.html", context)


@role_required(Role.MEMBER)
def host_detail(request: HttpRequest, name: str) -> HttpResponse:
    now = timezone.now()
    host = get_object_or_404(Host.objects.prefetch_related(_present_gpus()), name=name)
    context = {
        "host": _host_context(host, now),
        "now": now,
        "refresh_s": settings.BERTH_AGENT_INTERVAL_S,
    }
    if request.htmx:
        return render(request, "gpus/host.html#live", context)
    return render(request, "gpus/host.html", context)


@role_required(Role.MEMBER)
def gpu_detail(request: HttpRequest, name: str, index: int) -> HttpResponse:
    now = timezone.now()
    gpu = get_object_or_404(Gpu.objects.select_related("host"), host__name=name, index=index)
    hours = _window(request.GET.get("hours"))
    start = now - timedelta(hours=hours)
    rows, samples = chart_rows(gpu, start=start, end=now)
    total = gpu.memory_total_mib or max((row[1] or 0 for row in rows), default=0)
    power_top = gpu.power_limit_w or max((row[5] or 0 for row in rows), default=0)

    def line(column: int, y_max: float) -> charts.Line:
        return charts.history_line(
            [(row[0], row[column]) for row in rows], start=start, end=now, y_max=y_max
        )

    context = {
        "gpu": _decorate(gpu, now),
        "host": gpu.host,
        "hours": hours,
        "windows": HISTORY_WINDOWS_H,
        "samples": samples,
        "chart": {"width": charts.CHART_WIDTH, "height": charts.CHART_HEIGHT},
        "lines": [
            ("Memory used (MiB)", "memory", line(1, total), total),
            ("Foreign memory (MiB)", "foreign", line(2, total), total),
            ("Utilization (%)", "utilization", line(3, 100), 100),
            ("Temperature (°C)", "temperature", line(4, 100), 100),
            ("Power (W)", "power", line(5, power_top), power_top),
        ],
    }
    return render(request, "gpus/gpu.html", context)


def _window(raw: str | None) -> int:
    try:
        hours = int(raw or DEFAULT_WINDOW_H)
    except ValueError:
        return DEFAULT_WINDOW_H
    return hours if hours in HISTORY_WINDOWS_H else DEFAULT_WINDOW_H
