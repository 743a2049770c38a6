"""Hosts, their GPUs (one current-state row each) and the GPU history.

``Gpu`` is updated in place on every collection, so pages and placement read one narrow row per
GPU and never scan history. ``GpuSnapshot`` is the history: raw rows for
``BERTH_GPU_RAW_RETENTION_H``, then one rolled-up row per GPU per ``BERTH_GPU_ROLLUP_MINUTES``
until ``BERTH_GPU_ROLLUP_RETENTION_D`` (``gpus.inventory.compact_history``).

A host being *offline* is not stored: nobody is left to write it when a host dies, so it is
derived from the age of ``last_heartbeat`` (:meth:`Host.is_offline`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

host_name_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?$",
    "Use 1-64 lowercase letters, digits, dots and hyphens, starting and ending with a letter or "
    "digit (it becomes the RQ queue host:<name>).",
)


class HostStatus(models.TextChoices):
    PENDING = "pending", "Waiting for its agent"
    ONLINE = "online", "Online"
    INVENTORY_UNAVAILABLE = "inventory_unavailable", "Inventory unavailable"


class Host(models.Model):
    """A GPU server with a Docker engine and one Berth agent (``manage.py berth_agent``).

    Its GPUs are whatever the last successful collection read; when every source fails the
    host is ``inventory_unavailable`` with each source's error in ``inventory_errors``, and
    its GPU rows are kept but marked not present, so nothing can be placed there.
    """

    name = models.CharField(max_length=64, unique=True, validators=[host_name_validator])
    docker_endpoint = models.CharField(
        max_length=255,
        blank=True,
        help_text="Docker API address as the agent reaches it (unix:///var/run/docker.sock, "
        "tcp://host:2376); empty uses DOCKER_HOST or the local socket.",
    )
    labels = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=24, choices=HostStatus.choices, default=HostStatus.PENDING)
    nvidia_runtime = models.BooleanField(
        null=True, help_text="Whether the Docker engine offers the NVIDIA runtime (None: unknown)."
    )
    driver_version = models.CharField(max_length=64, blank=True)
    inventory_source = models.CharField(max_length=32, blank=True)
    inventory_errors = models.JSONField(default=list, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # The host's memory and cores as its agent last read them (CPU deployments are planned and
    # reserved against these); None until an agent has reported.
    memory_total_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    memory_available_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    cpu_count = models.PositiveIntegerField(null=True, blank=True)
    last_collected = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue_name(self) -> str:
        """The RQ queue this host's agent works on."""
        return f"host:{self.name}"

    def is_offline(self, now: datetime | None = None) -> bool:
        """No heartbeat within ``BERTH_AGENT_OFFLINE_AFTER`` collection intervals."""
        if self.last_heartbeat is None:
            return True
        return (now or timezone.now()) - self.last_heartbeat > offline_after()

    def state(self, now: datetime | None = None) -> str:
        """What the pages show: waiting, online, offline or inventory_unavailable."""
        if self.status == HostStatus.PENDING and self.last_heartbeat is None:
            return "waiting"
        if self.is_offline(now):
            return "offline"
        return self.status

    def placeable(self, now: datetime | None = None) -> bool:
        """Whether new work may be placed here at all."""
        return self.status == HostStatus.ONLINE and not self.is_offline(now)


def offline_after() -> timedelta:
    return timedelta(seconds=settings.BERTH_AGENT_INTERVAL_S * settings.BERTH_AGENT_OFFLINE_AFTER)


class Gpu(models.Model):
    """One GPU's identity and its latest reading, updated in place by each collection.

    ``index`` and ``uuid`` are always values a source reported; a GPU whose index no source
    stated is never stored.
    """

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    uuid = models.CharField(max_length=96, db_index=True)
    name = models.CharField(max_length=128)
    pci_bus_id = models.CharField(max_length=32, blank=True)
    memory_total_mib = models.PositiveIntegerField(null=True)
    compute_capability = models.CharField(max_length=8, blank=True)
    mig_enabled = models.BooleanField(null=True)
    # Current state.
    present = models.BooleanField(default=True)
    source = models.CharField(max_length=32, blank=True)
    seen_at = models.DateTimeField(null=True)
    memory_used_mib = models.PositiveIntegerField(null=True)
    memory_free_mib = models.PositiveIntegerField(null=True)
    memory_berth_mib = models.PositiveIntegerField(default=0)
    memory_foreign_mib = models.PositiveIntegerField(null=True)
    utilization_gpu_pct = models.PositiveSmallIntegerField(null=True)
    temperature_c = models.SmallIntegerField(null=True)
    power_w = models.FloatField(null=True)
    power_limit_w = models.FloatField(null=True)
    processes = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["host__name", "index"]
        constraints = [
            models.UniqueConstraint(fields=["host", "index"], name="gpu_unique_host_index")
        ]

    def __str__(self) -> str:
        return f"{self.host.name}:{self.index} ({self.name})"

    @property
    def foreign_processes(self) -> list[dict]:
        return [process for process in self.processes if not process.get("deployment")]

    @property
    def deployments(self) -> list[str]:
        """Berth deployments holding memory here (from container labels)."""
        return sorted({p["deployment"] for p in self.processes if p.get("deployment")})

    @property
    def flagged(self) -> bool:
        """Foreign memory above ``BERTH_GPU_FOREIGN_THRESHOLD_MIB``: placement avoids it."""
        return (self.memory_foreign_mib or 0) > settings.BERTH_GPU_FOREIGN_THRESHOLD_MIB


class Resolution(models.TextChoices):
    RAW = "raw", "Raw"
    ROLLUP = "rollup", "Rolled up"


class GpuSnapshot(models.Model):
    """One GPU at one time: a raw reading, or a roll-up (averages, maximum memory) of a bucket."""

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="snapshots")
    time = models.DateTimeField()
    resolution = models.CharField(max_length=8, choices=Resolution.choices, default=Resolution.RAW)
    source = models.CharField(max_length=32)
    memory_used_mib = models.PositiveIntegerField(null=True)
    memory_total_mib = models.PositiveIntegerField(null=True)
    memory_foreign_mib = models.PositiveIntegerField(null=True)
    utilization_gpu_pct = models.PositiveSmallIntegerField(null=True)
    temperature_c = models.SmallIntegerField(null=True)
    power_w = models.FloatField(null=True)
    processes = models.JSONField(default=list, blank=True)
    samples = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["gpu", "time"]
        indexes = [models.Index(fields=["gpu", "time"], name="gpusnapshot_gpu_time")]

    def __str__(self) -> str:
        return f"{self.gpu_id}@{self.time.isoformat()}"
