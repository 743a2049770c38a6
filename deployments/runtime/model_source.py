"""The model directory a launch mounts: resolved once, confined by construction, fingerprinted,
created from exactly that path, and checked again inside the container.

The attack (issue 15, finding 1): a member registered ``team-a/swap``, a link to a valid model of
their own, and swapped it for a link to ``../team-b/secret-model`` while deploys were requested.
The launch check resolved the path once and the container spec resolved it again, only checking
that it stayed inside the mount: 2 launches in 50 mounted team B's model. Now:

1. :func:`resolve` walks the path from the mount root one component at a time with ``openat``
   and ``O_NOFOLLOW``: any symbolic link among the directories below the mount root (the team
   folder included) is refused, so the directory is inside the team's folder by construction;
2. its device and inode and the fingerprint of its files are read from that one open directory;
3. the container is created from exactly the walked path (no link left to resolve);
4. the daemon still resolves that path itself when it mounts it, and a directory swapped for a
   link in between would move the mount. So :func:`verify_mount` compares the device and inode
   the container sees at its model path with the checked ones, right after the container
   starts — before the engine has read anything (vLLM spends seconds importing before it opens
   a file) — and removes the container on a mismatch.

The resolved source is recorded in the audit trail with the launch.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import audit
import docker
from audit.actions import Action, Outcome
from deployments.runtime.diagnostics import Finding
from deployments.runtime.host_checks import Refused
from models_registry.inspection import fingerprint

OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Called between the check and the create with (deployment, source): empty in production; a
# test puts a swap here to make the race of finding 1 deterministic.
BETWEEN_CHECK_AND_CREATE: list[Callable[[Any, ModelSource], None]] = []


@dataclass(frozen=True)
class ModelSource:
    """One checked model directory: where this host reads it and Docker mounts it (both free of
    links when checked), where the engine sees it, and what it was."""

    local: str
    host: str
    container: str
    device: int
    inode: int
    fingerprint: str

    @property
    def identity(self) -> str:
        return f"{self.device}:{self.inode}"


def resolve(model: Any) -> ModelSource:
    """Walk ``model``'s path below its mount root without following links (see the module
    docstring). Raises :class:`Refused` naming the component that is a link or missing."""
    where = model.translation()
    components = [part for part in where.relative.split("/") if part]
    fd = os.open(model.mount.local_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(components):
            try:
                child = os.open(name, OPEN_DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise _refused(model, "/".join(components[: depth + 1]), exc) from None
            os.close(fd)
            fd = child
        stat = os.fstat(fd)
        with os.scandir(fd) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        digest = fingerprint(entries)
    finally:
        os.close(fd)
    relative = "/".join(components)
    return ModelSource(
        local=posixpath.join(model.mount.local_path, relative)
        if relative
        else model.mount.local_path,
        host=posixpath.join(model.mount.host_path, relative) if relative else model.mount.host_path,
        container=where.container,
        device=stat.st_dev,
        inode=stat.st_ino,
        fingerprint=digest,
    )


def _join(root: str, relative: str) -> str:
    return posixpath.join(root, relative) if relative else root


def _refused(model: Any, component: str, exc: OSError) -> Refused:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        why = f"{component} is a symbolic link (or not a directory) below the mount root"
        fix = (
            "Register the model's real directory: a link in the path could be swapped for one "
            "into another team's folder between the check and the mount."
        )
    else:
        why = f"{component}: {exc.strerror}"
        fix = "Check that the model directory exists on this host (the storage is mounted)."
    audit.record(
        Action.DEPLOYMENT_PATH_CHANGED,
        target=model,
        outcome=Outcome.DENIED,
        model=model.path,
        reason=why,
    )
    return Refused(
        f"the model at {model.path} cannot be mounted safely: {why}",
        Finding("path-changed", "The model path cannot be mounted safely", fix, None, ""),
    )


def run_hooks(deployment: Any, source: ModelSource) -> None:
    for hook in BETWEEN_CHECK_AND_CREATE:
        hook(deployment, source)


def verify_mount(container: Any, source: ModelSource, deployment: Any) -> None:
    """The directory the started container sees at its model path must be the checked one
    (same device and inode); otherwise remove the container and refuse (audited)."""
    seen = seen_in_container(container, source.container)
    if seen == (source.device, source.inode):
        return
    container.remove(force=True)
    shown = f"{seen[0]}:{seen[1]}" if seen else "nothing readable"
    audit.record(
        Action.DEPLOYMENT_PATH_CHANGED,
        target=deployment,
        outcome=Outcome.DENIED,
        model=deployment.model.path,
        source=source.host,
        checked=source.identity,
        mounted=shown,
        reason="the container mounted another directory than the one checked",
    )
    raise Refused(
        f"the container mounted {shown} at {source.container}, not the checked directory "
        f"{source.host} ({source.identity}): the path was swapped between the check and the "
        "mount; the container was removed",
        Finding(
            "path-changed",
            "The model directory changed between the check and the mount",
            "Someone replaced a directory of the model's path while it launched: check who can "
            "write the team's folder, then restart the deployment.",
            None,
            "",
        ),
    )


def seen_in_container(container: Any, path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path`` inside the running container: through ``/proc/<pid>/root``
    where this process shares the host's process namespace (an agent beside its engine),
    otherwise by running ``stat`` in the container (a remote engine)."""
    container.reload()
    pid = container.attrs.get("State", {}).get("Pid") or 0
    if pid:
        try:
            stat = os.stat(f"/proc/{pid}/root{path}")
        except OSError:
            pass
        else:
            return stat.st_dev, stat.st_ino
    try:
        result = container.exec_run(["stat", "-c", "%d %i", path])
    except docker.errors.APIError:
        return None
    parts = result.output.decode(errors="replace").split()
    if result.exit_code != 0 or len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])
