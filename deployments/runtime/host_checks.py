"""Checks made on the GPU host right before a container is created, where a swap would matter.

Registration and the deploy form validated the model directory and the image; both can change
on disk or in the host's image store between then and the launch (a directory swapped for a
link after its check, a tag moved to other content). The launcher calls these two checks last;
each refusal is audited as ``denied`` and fails the launch with a finding that names the fix::

    check_model_unchanged(deployment, report)      # after inspecting the directory again
    image = pinned_image(client, deployment)        # the image id to create from, or None
"""

from __future__ import annotations

import os
from typing import Any

import audit
import docker
from audit.actions import Action, Outcome
from deployments.runtime.diagnostics import Finding


class Refused(Exception):
    """The host's copy of the model or image is not what was approved; ``findings`` say why."""

    def __init__(self, message: str, finding: Finding):
        super().__init__(message)
        self.findings = [finding]


def check_model_unchanged(deployment: Any, report: Any) -> None:
    """Refuse when the model directory fails its re-inspection here or its contents differ from
    the inspection the registry stored (a directory swapped for a link to another model
    changes the fingerprint of its files' names, sizes and times)."""
    model = deployment.model
    errors = [finding for finding in report.findings if finding.severity == "error"]
    if errors:
        why = errors[0].message
    elif (escape := outside_team_storage(model)) is not None:
        why = escape
    elif model.fingerprint and report.fingerprint != model.fingerprint:
        why = "its files are not the ones inspected at registration (names, sizes or times differ)"
    else:
        return
    audit.record(
        Action.DEPLOYMENT_PATH_CHANGED,
        target=deployment,
        outcome=Outcome.DENIED,
        model=model.path,
        reason=why,
        codes=[finding.code for finding in errors],
    )
    raise Refused(
        f"the model at {model.path} changed since it was registered: {why}",
        Finding(
            "path-changed",
            "The model directory changed between registration and launch",
            "Check who changed the directory; if the change is intended, inspect the model "
            "again on its page, then restart the deployment.",
            None,
            "",
        ),
    )


def outside_team_storage(model: Any) -> str | None:
    """Why ``model``'s directory, links resolved, is not in its team's part of the storage (a
    link to another team's model, or out of the mount), or None when it is."""
    from pathlib import Path

    where = model.translation()
    mount_root = Path(model.mount.local_path).resolve()
    team_root = mount_root if model.mount.team_id else mount_root / model.team.slug
    real = Path(where.local).resolve()
    if real == team_root or team_root in real.parents:
        return None
    return f"{model.path} resolves to {real}, outside team {model.team.slug}'s storage"


def resolved_host_path(model: Any) -> str:
    """The bind-mount source with links resolved here, right before create: Docker resolves
    links in a bind source itself (moby#3566), so handing it the resolved directory leaves no
    link to swap between this check and the daemon's (Docker resolves a bind source's links
    itself, moby#3566)."""
    import posixpath
    from pathlib import Path

    where = model.translation()
    relative = os.path.relpath(Path(where.local).resolve(), Path(model.mount.local_path).resolve())
    if relative == "." or relative.startswith(".."):
        return where.host  # outside the mount: the launch check refuses it
    return posixpath.join(model.mount.host_path, relative)


def image_labels(client: docker.DockerClient, reference: str) -> dict[str, str]:
    """The labels of the host's copy of ``reference`` ({} when the host lacks it: the launch
    then fails on the missing image with its own message)."""
    local = _local_image(client, reference)
    return dict(local.labels or {}) if local is not None else {}


def pinned_image(client: docker.DockerClient, deployment: Any) -> str | None:
    """For an allow-list entry pinned ``@sha256:``: the id of the local image that carries
    exactly that digest, to create the container from (a tag moved later changes nothing).
    Refused, and audited, when the host has no such image. None when the entry is not pinned."""
    image = deployment.image
    if not image.digest:
        return None
    local = _local_image(client, image.reference) or _local_image(client, image.digest)
    if local is not None and _carries(local, image.repository, image.digest):
        return local.id
    present = [
        digest
        for candidate in client.images.list(name=image.repository)
        for digest in [candidate.id, *_repo_digests(candidate)]
    ]
    why = (
        f"the host has {image.repository} only as {', '.join(sorted(set(present)))}"
        if present
        else f"the host has no image {image.repository}"
    )
    audit.record(
        Action.DEPLOYMENT_IMAGE_REFUSED,
        target=deployment,
        outcome=Outcome.DENIED,
        image=image.reference,
        reason=why,
    )
    raise Refused(
        f"the allow-list pins {image.reference} but {why}",
        Finding(
            "image-digest-mismatch",
            "The host's engine image is not the pinned digest",
            f"Pull the pinned image on the host (docker pull {image.reference}), or have an "
            "admin pin the digest the host should run.",
            None,
            "",
        ),
    )


def _local_image(client: docker.DockerClient, name: str) -> Any:
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


def _repo_digests(image: Any) -> list[str]:
    return [entry.rpartition("@")[2] for entry in image.attrs.get("RepoDigests") or []]


def _carries(local: Any, repository: str, digest: str) -> bool:
    """Pulled images carry ``repository@digest`` in RepoDigests; a locally built image has
    none, so its id (the config digest) must match and one of its tags name the repository.
    Names are compared in Docker's short form, which is how it reports Docker Hub images."""
    repository = _familiar(repository)
    digests = [_familiar(entry) for entry in local.attrs.get("RepoDigests") or []]
    if f"{repository}@{digest}" in digests:
        return True
    tags = [_familiar(tag.rpartition(":")[0]) for tag in local.attrs.get("RepoTags") or []]
    return local.id == digest and repository in tags


def _familiar(name: str) -> str:
    """``docker.io/library/ubuntu`` and ``library/ubuntu`` as Docker prints them: ``ubuntu``."""
    name = name.removeprefix("docker.io/")
    return name.removeprefix("library/") if name.count("/") == 1 else name
