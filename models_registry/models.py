"""Storage mounts and registered models.

Every model path is stored in canonical form: ``Model.save()`` runs it through
``paths.resolve`` against the registered mounts, ``QuerySet.update``/``bulk_create`` refuse a
path, and a database constraint rejects the shapes a raw path could take (relative, ``//``,
``..``, trailing slash), so no code path can store an un-normalized path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from accounts.access import TeamOwnedQuerySet
from accounts.models import Team, slug_validator
from models_registry import paths
from models_registry.tasks import model_task

_CANONICAL_SHAPE = (
    Q(path__startswith="/")
    & ~Q(path__contains="//")
    & ~Q(path__contains="/../")
    & ~Q(path__contains="/./")
    & ~Q(path__endswith="/")
    & ~Q(path__endswith="/..")
)


class StorageKind(models.TextChoices):
    """What backs a mount; it decides how vLLM should read weights from it (the loader and its
    concurrency, ``deployments.runtime.launch_spec.load_strategy``) and whether Berth prewarms
    the page cache before a launch."""

    AUTO = "auto", "Not stated (vLLM detects NFS/Lustre itself)"
    LOCAL = "local", "Local disk (NVMe/SSD)"
    NETWORK = "network", "Network filesystem (NFS, Ceph, Lustre)"
    OBJECT = "object", "Object store through FUSE (s3fs, gcsfuse, goofys)"


class StorageMount(models.Model):
    """One storage root and where each context sees it.

    ``team`` set: the whole mount belongs to that team. ``team`` empty: the mount holds one
    folder per team, named by the team's slug (``/ceph/models/<team-slug>/<model>``), and a
    model belongs to the team whose folder it is in.
    """

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    canonical_prefix = models.CharField(
        max_length=paths.MAX_PATH_LENGTH,
        unique=True,
        help_text="What users write, e.g. /ceph/models",
    )
    local_path = models.CharField(
        max_length=paths.MAX_PATH_LENGTH,
        help_text="Where Berth's web and worker processes read it, e.g. /fsx/models",
    )
    host_path = models.CharField(
        max_length=paths.MAX_PATH_LENGTH,
        help_text="Where the Docker daemon on each GPU host sees it: the bind-mount source",
    )
    container_path = models.CharField(
        max_length=paths.MAX_PATH_LENGTH,
        default="/models",
        help_text="Read-only path inside the engine container",
    )
    team = models.ForeignKey(
        Team,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="storage_mounts",
        help_text="Owner of the whole mount; empty means one folder per team slug",
    )
    kind = models.CharField(
        max_length=8,
        choices=StorageKind.choices,
        default=StorageKind.AUTO,
        help_text="What backs the mount: chooses vLLM's load strategy and the page-cache prewarm",
    )
    sync_interval_minutes = models.PositiveIntegerField(
        default=0, help_text="Re-scan the mount this often (0: only when an admin asks)"
    )
    last_synced = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.canonical_prefix})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.full_clean(exclude=["team"] if self.team_id is None else None, validate_unique=False)
        super().save(*args, **kwargs)

    def clean(self) -> None:
        errors = {}
        for field in ("canonical_prefix", "local_path", "host_path", "container_path"):
            try:
                setattr(self, field, paths.normalize(getattr(self, field), field=field))
            except paths.PathError as exc:
                errors[field] = str(exc)
        if "canonical_prefix" not in errors:
            others = StorageMount.objects.exclude(pk=self.pk).values_list(
                "canonical_prefix", flat=True
            )
            for other in others:
                if paths.is_within(self.canonical_prefix, other) or paths.is_within(
                    other, self.canonical_prefix
                ):
                    errors["canonical_prefix"] = (
                        f"overlaps the mount at {other}; mounts may not nest"
                    )
        if errors:
            raise ValidationError(errors)

    def as_mount(self) -> paths.Mount:
        return paths.Mount(
            self.name, self.canonical_prefix, self.local_path, self.host_path, self.container_path
        )

    def confinement_for(self, translation: paths.Translation) -> Path:
        """Where a model at ``translation`` must stay, links included (where this process sees
        it): the whole mount when one team owns it, else the team's own folder — so a link from
        team A's folder into team B's cannot lend A team B's weights (hostile case 3 of
        ``tests/test_hostile_input.py``)."""
        root = Path(self.local_path)
        if self.team_id is not None or "/" not in translation.relative:
            return root
        return root / translation.relative.split("/", 1)[0]

    def owner_for(self, translation: paths.Translation) -> Team | None:
        """The team that owns a model at ``translation`` in this mount (None: no such team)."""
        if self.team_id is not None:
            return self.team
        first = translation.relative.split("/", 1)[0]
        return Team.objects.filter(slug=first).first() if "/" in translation.relative else None


def all_mounts() -> list[paths.Mount]:
    return [mount.as_mount() for mount in StorageMount.objects.all()]


class ModelStatus(models.TextChoices):
    OK = "ok", "Ready"
    WARNINGS = "warnings", "Ready, with warnings"
    ERRORS = "errors", "Not deployable"
    MISSING = "missing", "Missing on disk"


class ModelQuerySet(TeamOwnedQuerySet):
    """Team-visible queries; the path can only change through ``Model.save()``."""

    def update(self, **kwargs: Any) -> int:
        if "path" in kwargs:
            raise ValueError("a model path changes only through Model.save(), which normalizes it")
        return super().update(**kwargs)

    def bulk_create(self, objs: Any, *args: Any, **kwargs: Any) -> list[Model]:
        objs = list(objs)
        for obj in objs:
            obj.normalize_path()
        return super().bulk_create(objs, *args, **kwargs)


class Model(models.Model):
    """A model directory registered for a team, with the result of its last inspection."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="models")
    mount = models.ForeignKey(StorageMount, on_delete=models.PROTECT, related_name="models")
    path = models.CharField(max_length=paths.MAX_PATH_LENGTH, unique=True)
    name = models.CharField(max_length=paths.MAX_SEGMENT_LENGTH)
    status = models.CharField(
        max_length=10, choices=ModelStatus.choices, default=ModelStatus.ERRORS
    )
    architecture = models.CharField(max_length=200, blank=True)
    model_type = models.CharField(max_length=100, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    weights_bytes = models.BigIntegerField(null=True, blank=True)
    weights_format = models.CharField(max_length=20, blank=True)
    dtypes = models.JSONField(default=dict, blank=True)
    tokenizer = models.JSONField(default=dict, blank=True)
    findings = models.JSONField(default=list, blank=True)
    files = models.JSONField(default=list, blank=True)
    config = models.JSONField(default=dict, blank=True)
    fingerprint = models.CharField(max_length=64, blank=True)
    # vLLM's --trust-remote-code runs Python shipped with the model: only after an admin has
    # reviewed that code (Admin → Models → "Approve remote code"; audited).
    remote_code_approved = models.BooleanField(default=False)
    inspected_at = models.DateTimeField(null=True, blank=True)
    registered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    objects = ModelQuerySet.as_manager()

    class Meta:
        ordering = ["team__slug", "path"]
        constraints = [
            models.CheckConstraint(condition=_CANONICAL_SHAPE, name="model_path_canonical")
        ]
        indexes = [models.Index(fields=["mount", "status"], name="model_mount_status_idx")]

    def __str__(self) -> str:
        return self.path

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.path != getattr(self, "_resolved_path", None):
            self.normalize_path()
        super().save(*args, **kwargs)

    @classmethod
    def at(cls, translation: paths.Translation, mount: StorageMount, **fields: Any) -> Model:
        """A new model at a path already resolved against ``mount`` (``paths.resolve``): its
        save does not resolve it a second time."""
        model = cls(mount=mount, path=translation.canonical, **fields)
        model.name = translation.canonical.rsplit("/", 1)[-1]
        model._resolved_path = translation.canonical
        return model

    def normalize_path(self) -> paths.Translation:
        """Normalize ``path`` against the registered mounts and point ``mount`` at its mount;
        ``ValidationError`` on the ``path`` field otherwise."""
        mounts = {mount.name: mount for mount in StorageMount.objects.all()}
        try:
            translation = paths.resolve(self.path, [mount.as_mount() for mount in mounts.values()])
        except paths.PathError as exc:
            raise ValidationError({"path": str(exc)}) from None
        self.path, self.mount = translation.canonical, mounts[translation.mount]
        self.name = self.path.rsplit("/", 1)[-1]
        self._resolved_path = self.path
        return translation

    @property
    def deployable(self) -> bool:
        """A model with any error finding (or missing on disk) cannot be deployed."""
        return self.status in (ModelStatus.OK, ModelStatus.WARNINGS)

    @property
    def task(self) -> str:
        """``generate`` or ``embed`` (``models_registry.tasks``), from the inspected files."""
        return model_task(self.architecture, (entry.get("name", "") for entry in self.files))

    def translation(self) -> paths.Translation:
        return paths.translate(self.path, self.mount.as_mount())

    def error_findings(self) -> list[dict[str, str]]:
        return [finding for finding in self.findings if finding.get("severity") == "error"]
