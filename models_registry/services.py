"""Registering and re-inspecting models. Every outcome is audited, refusals included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

import audit
from accounts.access import team_ids
from accounts.models import Team
from audit.actions import Action, Outcome
from audit.trail import Target, denial_reason
from models_registry import paths
from models_registry.inspection import Inspection, inspect_directory
from models_registry.models import Model, ModelStatus, StorageMount


def inspect_translation(translation: paths.Translation, mount: StorageMount) -> Inspection:
    """Inspect the directory where this process sees it, confined to the team's part of the
    mount (:meth:`StorageMount.confinement_for`)."""
    return inspect_directory(
        Path(translation.local),
        storage_root=mount.confinement_for(translation),
        display_path=translation.canonical,
    )


def locate(raw_path: object, team: Team) -> tuple[paths.Translation, StorageMount]:
    """Resolve a user-typed path for ``team``: normalized, inside a mount, in the team's part
    of it. Raises ``ValidationError`` on the ``path`` field with the fix."""
    mounts = {mount.name: mount for mount in StorageMount.objects.select_related("team")}
    try:
        translation = paths.resolve(raw_path, [mount.as_mount() for mount in mounts.values()])
    except paths.PathError as exc:
        raise ValidationError({"path": str(exc)}) from None
    mount = mounts[translation.mount]
    owner = mount.owner_for(translation)
    if owner is None or owner.pk != team.pk:
        where = (
            f"the mount {mount.name} belongs to team {mount.team.slug}"
            if mount.team_id
            else f"team {team.slug}'s models live under {mount.canonical_prefix}/{team.slug}/"
        )
        raise ValidationError(
            {"path": f"{translation.canonical} is not in team {team.slug}'s storage: {where}"}
        )
    return translation, mount


def preview(user: Any, team: Team, raw_path: object) -> Inspection:
    """Inspection of a path before registering it (nothing is saved or audited)."""
    _check_member(user, team)
    translation, mount = locate(raw_path, team)
    return inspect_translation(translation, mount)


def register(user: Any, team: Team, raw_path: object) -> Model:
    """Register the model at ``raw_path`` for ``team`` and inspect it. A model with errors is
    registered too (its page shows the remedies) but cannot be deployed."""
    try:
        _check_member(user, team)
        translation, mount = locate(raw_path, team)
        if Model.objects.filter(path=translation.canonical).exists():
            raise ValidationError({"path": f"{translation.canonical} is already registered"})
    except (ValidationError, PermissionDenied) as exc:
        audit.record(
            Action.MODEL_REGISTERED,
            outcome=Outcome.DENIED,
            team=team,
            target=Target("path", str(raw_path)[:64], str(raw_path)[:200]),
            reason=denial_reason(exc),
            attempted={"team": team.slug, "path": str(raw_path)[:200]},
        )
        raise
    report = inspect_translation(translation, mount)
    with transaction.atomic():
        model = Model.at(translation, mount, team=team, registered_by=user)
        apply_inspection(model, report)
        model.save()
        audit.record(Action.MODEL_REGISTERED, target=model, actor=user, **_summary(model))
    return model


def reinspect(model: Model, user: Any = None) -> Model:
    """Inspect a registered model again and store the result (audited; ``user`` defaults to
    the actor of the current request or job)."""
    report = inspect_translation(model.translation(), model.mount)
    with transaction.atomic():
        apply_inspection(model, report)
        model.save()
        audit.record(Action.MODEL_INSPECTED, target=model, actor=user, **_summary(model))
    return model


def apply_inspection(model: Model, report: Inspection) -> None:
    """Copy an inspection's results onto the model row (not saved)."""
    errors = [f for f in report.findings if f.severity == "error"]
    if any(f.code == "path-not-found" for f in errors):
        model.status = ModelStatus.MISSING
    elif errors:
        model.status = ModelStatus.ERRORS
    else:
        model.status = ModelStatus.WARNINGS if report.findings else ModelStatus.OK
    model.architecture = report.architecture or ""
    model.model_type = report.model_type or ""
    model.parameter_count = report.parameter_count
    model.weights_bytes = report.weights_bytes
    model.weights_format = report.weights_format or ""
    model.dtypes = report.dtypes
    model.tokenizer = report.tokenizer
    model.findings = report.as_json()["findings"]
    model.files = report.files
    model.config = report.config
    model.fingerprint = report.fingerprint
    model.inspected_at = timezone.now()


def _summary(model: Model) -> dict[str, Any]:
    return {
        "path": model.path,
        "status": model.status,
        "parameter_count": model.parameter_count,
        "weights_bytes": model.weights_bytes,
        "finding_codes": [finding["code"] for finding in model.findings],
    }


def _check_member(user: Any, team: Team) -> None:
    if not (getattr(user, "is_admin", False) or team.pk in team_ids(user)):
        raise PermissionDenied(f"you are not a member of team {team.slug}")
