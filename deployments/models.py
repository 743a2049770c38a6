"""Deployments, their timeline, the engine image allow-list and GPU allocations.

The database guards what must never break: one active allocation per GPU (a partial unique
constraint, on SQLite and PostgreSQL), and a deployment's state only moves along the lifecycle
in ``deployments.states`` through :meth:`Deployment.transition` — a conditional update checked
by row count, so two writers cannot both win.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

import audit
from accounts.access import TeamOwnedQuerySet
from accounts.models import Team, slug_validator
from audit.actions import Action, Outcome
from core import naming
from deployments.changes import publish
from deployments.planning.cpu import CpuPlan
from deployments.planning.stored import StoredPlan
from deployments.states import ACTIVE, NAMED, State, check_transition

# repository[:tag][@sha256:<64 hex>] — Docker's reference grammar, narrowed: lowercase
# repository path (optionally a registry host:port first), tag, digest. No whitespace, newline or
# shell metacharacter can pass (matched with fullmatch: ``$`` would let a trailing newline in).
IMAGE_REFERENCE = re.compile(
    r"(?P<repository>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5}(?=/))?"
    r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
MAX_IMAGE_ENV_VALUE = 1024
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
PROBE_ARGUMENT = re.compile(r"^[A-Za-z0-9_./:=-]{1,200}$")


class EngineImage(models.Model):
    """An engine image admins allow (vLLM, or the labelled stand-in for tests and demos)."""

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    reference = models.CharField(
        max_length=300, help_text="repository:tag, pinned @sha256:… where known"
    )
    description = models.CharField(max_length=200, blank=True)
    gpu_capable = models.BooleanField(default=True)
    cpu_capable = models.BooleanField(default=False, help_text="May run with 0 GPUs")
    is_stand_in = models.BooleanField(
        default=False, help_text="Not vLLM: a test engine; shown as such"
    )
    health_command = models.JSONField(
        default=list,
        blank=True,
        help_text='Exec-form probe, e.g. ["curl", "-fsS", "http://127.0.0.1:8000/health"]',
    )
    environment = models.JSONField(
        default=dict,
        blank=True,
        help_text="Variables every container of this image gets (admin-owned, not allow-listed)",
    )
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.reference})"

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` when the reference is pinned by digest, else ''."""
        match = IMAGE_REFERENCE.fullmatch(self.reference or "")
        return (match and match.group("digest")) or ""

    @property
    def repository(self) -> str:
        """The reference without tag and digest (``vllm/vllm-openai``)."""
        match = IMAGE_REFERENCE.fullmatch(self.reference or "")
        return match.group("repository") if match else ""

    def clean(self) -> None:
        errors = {}
        if not IMAGE_REFERENCE.fullmatch(self.reference or ""):
            errors["reference"] = (
                "write repository[:tag][@sha256:<64 hex digits>], e.g. vllm/vllm-openai:v0.11.0"
            )
        probe = self.health_command or []
        if not (
            isinstance(probe, list)
            and all(isinstance(a, str) and PROBE_ARGUMENT.fullmatch(a) for a in probe)
        ):
            errors["health_command"] = (
                "a JSON list of plain arguments (exec form; no shell, no spaces in one argument)"
            )
        variables = self.environment or {}
        if not isinstance(variables, dict) or not all(
            isinstance(k, str)
            and ENV_NAME.fullmatch(k)
            and isinstance(v, str)
            and v.isprintable()
            and len(v) <= 1024
            for k, v in variables.items()
        ):
            errors["environment"] = (
                'a JSON object of NAME: "value" pairs (upper-case names, printable values)'
            )
        if not (self.gpu_capable or self.cpu_capable):
            errors["cpu_capable"] = "an image must run with GPUs, without them, or both"
        if errors:
            raise ValidationError(errors)


class DeploymentQuerySet(TeamOwnedQuerySet):
    def active(self) -> DeploymentQuerySet:
        return self.filter(state__in=ACTIVE)

    def primaries(self) -> DeploymentQuerySet:
        """The deployments people act on (each one's first replica)."""
        return self.filter(replica_of__isnull=True)


MAX_REPLICAS = 16
# Scaling policy defaults: scale up once each ready replica has 2 requests waiting in vLLM's own
# queue (or 80 % of its KV cache is used) for 30 s; down after 5 calm minutes; to zero after
# 15 minutes without a request (when the minimum is 0).
DEFAULT_TARGET_WAITING = 2.0
DEFAULT_TARGET_KV_CACHE = 0.8
DEFAULT_SCALE_UP_WINDOW_S = 30
DEFAULT_SCALE_DOWN_WINDOW_S = 300
DEFAULT_IDLE_AFTER_S = 900


class Deployment(models.Model):
    """A model served by engine containers, owned by a team: one row per replica.

    The deployment people name, request and act on is its first replica (``replica_of`` None,
    ``replica_index`` 0), which also holds the desired count (``replicas``). Each further replica
    is a row of its own pointing at it, with its own host, GPUs, container, health and timeline,
    so launching, watching, allocation and reconcile work per replica unchanged, and the gateway
    routes the name to every ready row of the team that carries it.
    """

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=64, validators=[slug_validator])
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="deployments")
    model = models.ForeignKey(
        "models_registry.Model", on_delete=models.PROTECT, related_name="deployments"
    )
    host = models.ForeignKey("gpus.Host", on_delete=models.PROTECT, related_name="deployments")
    image = models.ForeignKey(EngineImage, on_delete=models.PROTECT, related_name="deployments")
    replica_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="replica_rows"
    )
    replica_index = models.PositiveSmallIntegerField(default=0)
    # The desired number of replicas (on the first replica's row; 1 on the others).
    replicas = models.PositiveSmallIntegerField(default=1)
    # The GPUs the deployment holds, one tensor-parallel rank each (0: a CPU engine).
    gpu_count = models.PositiveSmallIntegerField()
    engine_args = models.JSONField(default=dict, blank=True)
    environment = models.JSONField(default=dict, blank=True)
    plan = models.JSONField(default=dict, blank=True)
    # Host memory a CPU deployment holds while active (its container's memory limit, from the
    # CPU plan); 0 for GPU deployments and the stand-in.
    host_memory_bytes = models.PositiveBigIntegerField(default=0)
    host_port = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(
        max_length=12, choices=State.choices, default=State.PENDING, db_index=True
    )
    generation = models.PositiveIntegerField(default=1)
    container_id = models.CharField(max_length=80, blank=True)
    # The engine's own bearer token (vLLM's VLLM_API_KEY), made at the first launch and held
    # by the gateway: users never see it, so only the gateway can reach the engine's API.
    engine_key = models.CharField(max_length=64, blank=True, editable=False)
    health_start_period_s = models.PositiveIntegerField(default=600)
    stall_timeout_s = models.PositiveIntegerField(default=600)
    engine_ready_timeout_s = models.PositiveIntegerField(default=600)
    last_error = models.TextField(blank=True)
    diagnosis = models.JSONField(default=list, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    last_progress_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    # The watcher's place in the container log (Unix time of the last line read), the last
    # lines themselves for the page, and the restart count it saw last.
    logs_read_until = models.FloatField(default=0)
    log_tail = models.JSONField(default=list, blank=True)
    restart_count = models.PositiveIntegerField(default=0)
    # Set when someone asks to delete it: the host's agent removes what is left, then the row;
    # until then the deployment is shown as being deleted and cannot be restarted.
    delete_requested_at = models.DateTimeField(null=True, blank=True)

    # --- The scaling policy (on the first replica's row; ``deployments.scaling``) -------------
    # Off: ``replicas`` is what people asked for. On: the scaler keeps ``replicas`` between the
    # bounds from the engines' own load, and at 0 the deployment is ``idle`` until a request.
    autoscale = models.BooleanField(default=False)
    min_replicas = models.PositiveSmallIntegerField(default=1)
    max_replicas = models.PositiveSmallIntegerField(default=1)
    # Targets in vLLM's own terms (its /metrics): requests waiting per ready replica, and the
    # mean share of the KV cache in use (0-1).
    target_waiting = models.FloatField(default=DEFAULT_TARGET_WAITING)
    target_kv_cache = models.FloatField(default=DEFAULT_TARGET_KV_CACHE)
    scale_up_window_s = models.PositiveIntegerField(default=DEFAULT_SCALE_UP_WINDOW_S)
    scale_down_window_s = models.PositiveIntegerField(default=DEFAULT_SCALE_DOWN_WINDOW_S)
    # With min_replicas 0: no request for this long, and nothing running, takes it to idle.
    idle_after_s = models.PositiveIntegerField(default=DEFAULT_IDLE_AFTER_S)
    # The scaler's memory between ticks (since when pressure or calm was seen).
    scaler_state = models.JSONField(default=dict, blank=True)
    # Why the last scale-up or wake could not be made ("" once one succeeds): shown on the page
    # and in the gateway's answers to the requests waiting for it.
    scaling_blocked = models.CharField(max_length=500, blank=True)
    woken_at = models.DateTimeField(null=True, blank=True)  # the last wake's first request

    objects = DeploymentQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "host_port"],
                condition=Q(state__in=sorted(ACTIVE), host_port__isnull=False),
                name="deployment_active_port_unique",
            ),
            models.UniqueConstraint(
                fields=["team", "name", "replica_index"],
                condition=Q(state__in=sorted(NAMED)),
                name="deployment_active_name_unique",
            ),
            models.CheckConstraint(
                condition=Q(min_replicas__lte=models.F("max_replicas"), max_replicas__gte=1)
                & Q(max_replicas__lte=MAX_REPLICAS),
                name="deployment_scaling_bounds",
            ),
            models.CheckConstraint(
                condition=Q(replica_of__isnull=True, replica_index=0)
                | Q(replica_of__isnull=False, replica_index__gt=0, replicas=1),
                name="deployment_replica_index_matches",
            ),
        ]

    def __str__(self) -> str:
        suffix = f" (replica {self.replica_index + 1})" if self.replica_index else ""
        return f"{self.team.slug}/{self.name}{suffix}"

    @property
    def is_replica(self) -> bool:
        """A further replica (not the deployment people act on)."""
        return self.replica_of_id is not None

    @property
    def primary_id(self) -> int:
        """The pk of the deployment this row is a replica of (its own for the first)."""
        return self.replica_of_id or self.pk

    def group(self) -> DeploymentQuerySet:
        """Every replica's row of this deployment, the first one included, by index."""
        primary = self.primary_id
        return Deployment.objects.filter(Q(pk=primary) | Q(replica_of_id=primary)).order_by(
            "replica_index"
        )

    @property
    def tensor_parallel_size(self) -> int:
        """vLLM's ``--tensor-parallel-size``: one rank per GPU held, 1 for a CPU engine."""
        return max(self.gpu_count, 1)

    @property
    def stored_plan(self) -> StoredPlan | None:
        """The plan this deployment was requested with (None for a CPU engine: nothing to
        plan)."""
        return StoredPlan.from_json(self.plan)

    @property
    def cpu_plan(self) -> CpuPlan | None:
        """The CPU plan a real CPU engine was requested with (host memory, KV space)."""
        return CpuPlan.from_json(self.plan)

    @property
    def container_name(self) -> str:
        return naming.container_name(self.pk, self.generation, settings.BERTH_INSTANCE)

    def store(self, **values: Any) -> None:
        """Write these fields with one UPDATE and keep this instance in step (not ``save()``:
        a job holds a row for minutes while other writers change its other columns)."""
        Deployment.objects.filter(pk=self.pk).update(**values)
        for name, value in values.items():
            setattr(self, name, value)

    def transition(self, new: State, *, message: str = "", **data: Any) -> bool:
        """Move to ``new`` if the lifecycle allows it and nobody moved first (conditional update on
        state and generation). Writes the event and the audit record in the same transaction.
        Returns False when another writer got there first."""
        old = State(self.state)
        check_transition(old, new)
        with audit.chain_transaction():
            changed = Deployment.objects.filter(
                pk=self.pk, state=old, generation=self.generation
            ).update(state=new, updated=timezone.now())
            if not changed:
                return False
            self.state = new
            DeploymentEvent.objects.create(
                deployment=self,
                generation=self.generation,
                kind=EventKind.STATE,
                state=new,
                message=message or f"{old} → {new}",
                data=data,
            )
            audit.record(
                Action.DEPLOYMENT_STATE_CHANGED,
                target=self,
                # An auditor filtering on "failed" must find the deployments that failed.
                outcome=Outcome.FAILED if new == State.FAILED else Outcome.OK,
                old=str(old),
                new=str(new),
                message=message,
                generation=self.generation,
                **data,
            )
            publish(self.pk, "state")
        return True


class EventKind(models.TextChoices):
    STATE = "state", "State"
    HEALTH = "health", "Health"
    PROGRESS = "progress", "Progress"
    LOG = "log", "Log"
    DIAGNOSIS = "diagnosis", "Diagnosis"
    INFO = "info", "Info"


class DeploymentEvent(models.Model):
    """One entry of a deployment's timeline."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    generation = models.PositiveIntegerField()
    time = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=10, choices=EventKind.choices)
    state = models.CharField(max_length=12, choices=State.choices, blank=True)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["time", "id"]
        indexes = [models.Index(fields=["deployment", "time"], name="deployment_event_time_idx")]

    def __str__(self) -> str:
        return f"{self.deployment_id} {self.kind}: {self.message[:60]}"


class ScalingSample(models.Model):
    """One look of the scaler at a deployment: the replicas it wanted and had, and the load
    that drove it (for the page's chart; kept ``deployments.scaling.SAMPLES_KEPT``)."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.CASCADE, related_name="scaling_samples"
    )
    time = models.DateTimeField(default=timezone.now)
    desired = models.PositiveSmallIntegerField()
    ready = models.PositiveSmallIntegerField()
    starting = models.PositiveSmallIntegerField(default=0)
    waiting = models.FloatField(default=0)  # in the engines' own queues, all replicas
    running = models.FloatField(default=0)
    queued = models.PositiveIntegerField(default=0)  # held or queued in the gateways
    kv_cache = models.FloatField(null=True, blank=True)  # mean over ready replicas, 0-1

    class Meta:
        ordering = ["time", "id"]
        indexes = [models.Index(fields=["deployment", "time"], name="scaling_sample_time_idx")]

    def __str__(self) -> str:
        return f"{self.deployment_id} {self.time:%H:%M:%S} {self.ready}/{self.desired}"


class GpuAllocation(models.Model):
    """A GPU held by a deployment generation. At most one *active* allocation per GPU: the
    database refuses a second one, whatever the application code does."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="allocations")
    gpu = models.ForeignKey("gpus.Gpu", on_delete=models.PROTECT, related_name="allocations")
    generation = models.PositiveIntegerField()
    active = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["gpu"], condition=Q(active=True), name="one_active_allocation_per_gpu"
            )
        ]

    def __str__(self) -> str:
        held = "" if self.active else ", released"
        return f"{self.gpu} → {self.deployment} (g{self.generation}{held})"
