"""Filesystem sync: discover model directories under a mount and bring the registry up to date.

New directories are registered and inspected, changed ones (their fingerprint moved) are
re-inspected, vanished ones are marked ``missing`` — rows are never deleted, files are never
created, touched or "repaired". A second run over an unchanged tree changes nothing::

    result = sync_mount(mount)      # SyncResult(created=12, updated=0, unchanged=1988, ...)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.db import transaction
from django.utils import timezone

import audit
from accounts.models import Team
from audit.actions import Action, Outcome
from models_registry import paths
from models_registry.inspection import fingerprint
from models_registry.models import Model, ModelStatus, StorageMount
from models_registry.services import apply_inspection, inspect_translation

MAX_DEPTH = 4  # team folder / organisation / model / revision
# A directory holding any of these is a model directory; sync does not look inside it further.
MARKERS = ("config.json", "model.safetensors.index.json")
MARKER_SUFFIXES = (".safetensors", ".bin")


class SyncError(Exception):
    """The mount cannot be synced at all (its root is missing): nothing was changed."""


@dataclass
class SyncResult:
    mount: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    missing: int = 0
    unowned: list[str] = field(default_factory=list)  # directories outside any team's folder
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"} per directory
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return self.created + self.updated + self.missing


def sync_mount(mount: StorageMount) -> SyncResult:
    """Sync one mount (see the module docstring); the run and each change are audited."""
    started = time.perf_counter()
    root = Path(mount.local_path)
    if not root.is_dir():
        audit.record(
            Action.MODELS_SYNCED,
            outcome=Outcome.FAILED,
            target=mount,
            team=mount.team,
            error=f"mount root {root} does not exist or is not a directory",
        )
        raise SyncError(
            f"the mount {mount.name}'s root {root} does not exist or is not a directory on this "
            "machine; mount the storage there (or fix the mount's local path) and sync again"
        )
    result = SyncResult(mount=mount.name)
    known = {
        model.path: model for model in Model.objects.filter(mount=mount).select_related("team")
    }
    teams = {team.slug: team for team in Team.objects.all()}
    seen: set[str] = set()
    for directory in discover(root):
        try:
            translation = paths.translate(_canonical(mount, root, directory), mount.as_mount())
            seen.add(translation.canonical)
            model = known.get(translation.canonical)
            _sync_one(mount, translation, directory, model, teams, result)
        except Exception as exc:  # one member's directory must not stop the shared mount's sync
            _record_failure(mount, directory, exc, result)
    for path, model in known.items():
        if path not in seen and model.status != ModelStatus.MISSING:
            _mark_missing(model, result)
    StorageMount.objects.filter(pk=mount.pk).update(last_synced=timezone.now())
    result.seconds = round(time.perf_counter() - started, 3)
    audit.record(Action.MODELS_SYNCED, target=mount, team=mount.team, **asdict(result))
    return result


def _record_failure(
    mount: StorageMount, directory: Path, exc: Exception, result: SyncResult
) -> None:
    """Audit a directory the sync could not take in (its name cannot be a canonical path, it
    cannot be read...) and go on with the others."""
    error = f"{type(exc).__name__}: {exc}"[:500]
    result.failed.append({"path": str(directory), "error": error})
    audit.record(
        Action.MODEL_SYNC_FAILED,
        outcome=Outcome.FAILED,
        target=mount,
        team=mount.team,
        path=str(directory)[:500],
        error=error,
    )


def discover(root: Path) -> Iterator[Path]:
    """Model directories under ``root`` (symlinked folders and hidden ones are not followed)."""
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        if depth > 0 and _is_model_dir(entries):
            yield directory
            continue
        if depth < MAX_DEPTH:
            stack.extend(
                (Path(entry.path), depth + 1)
                for entry in sorted(entries, key=lambda e: e.name, reverse=True)
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
            )


def _is_model_dir(entries: list[os.DirEntry]) -> bool:
    return any(
        entry.name in MARKERS or entry.name.endswith(MARKER_SUFFIXES)
        for entry in entries
        if not entry.is_dir(follow_symlinks=False)
    )


def _canonical(mount: StorageMount, root: Path, directory: Path) -> str:
    relative = directory.relative_to(root).as_posix()
    return paths.normalize(f"{mount.canonical_prefix}/{relative}")


def _sync_one(
    mount: StorageMount,
    translation: paths.Translation,
    directory: Path,
    model: Model | None,
    teams: dict[str, Team],
    result: SyncResult,
) -> None:
    if (
        model is not None
        and model.status != ModelStatus.MISSING
        and model.fingerprint == _fingerprint(directory)
    ):
        result.unchanged += 1
        return
    team = model.team if model is not None else _owner(mount, translation, teams)
    if team is None:
        result.unowned.append(translation.canonical)
        return
    report = inspect_translation(translation, mount)
    with transaction.atomic():
        created = model is None
        model = model or Model.at(translation, mount, team=team)
        apply_inspection(model, report)
        model.save()
        action = Action.MODEL_REGISTERED if created else Action.MODEL_INSPECTED
        audit.record(
            action,
            target=model,
            via="sync",
            status=model.status,
            finding_codes=[finding["code"] for finding in model.findings],
        )
    if created:
        result.created += 1
    else:
        result.updated += 1


def _owner(
    mount: StorageMount, translation: paths.Translation, teams: dict[str, Team]
) -> Team | None:
    """The mount's team, or the team whose folder (first segment) holds the model."""
    if mount.team_id:
        return mount.team
    folder, _, rest = translation.relative.partition("/")
    return teams.get(folder) if rest else None


def _fingerprint(directory: Path) -> str:
    try:
        return fingerprint(sorted(os.scandir(directory), key=lambda entry: entry.name))
    except OSError:
        return ""


def _mark_missing(model: Model, result: SyncResult) -> None:
    with transaction.atomic():
        Model.objects.filter(pk=model.pk).update(status=ModelStatus.MISSING, updated=timezone.now())
        audit.record(Action.MODEL_MISSING, target=model, previous_status=model.status)
    result.missing += 1
