"""Model paths: one canonical form, checked strictly, translated per context.

A model has exactly one canonical path — what users type, e.g.
``/ceph/models/team-a/Llama-3.3-70B-Instruct`` — and a storage mount says where that same
directory is seen from each context::

    mount = Mount("ceph", canonical="/ceph/models", local="/fsx/models",
                  host="/mnt/ceph/models", container="/models")
    path = normalize("/ceph/models/team-a/Llama-3.3-70B-Instruct/", field="path")
    translate(path, mount).local       # '/fsx/models/team-a/Llama-3.3-70B-Instruct'

Pure functions, no filesystem access: whether the directory exists and whether its symlinks stay
inside the storage root is checked by ``inspection`` on the machine that reads it.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

MAX_PATH_LENGTH = 1024
MAX_SEGMENT_LENGTH = 128
# Letters, digits, dot, underscore, hyphen; not starting with a dot or hyphen (no "..", no
# hidden files, nothing a program could read as an option). "%" is absent, so percent-encoded
# tricks such as "..%2f" are refused rather than decoded.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class PathError(ValueError):
    """A path that cannot be stored; ``field`` names the input and the message says the fix."""

    def __init__(self, message: str, *, field: str = "path", code: str = "path-invalid"):
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass(frozen=True)
class Mount:
    """Where one storage root is seen from each context (all absolute, normalized)."""

    name: str
    canonical: str  # what users write and Berth stores: /ceph/models
    local: str  # where Berth's web and worker processes read it: /fsx/models
    host: str  # where the Docker daemon on a GPU host sees it (bind-mount source)
    container: str  # where vLLM sees it inside the engine container (read-only)


@dataclass(frozen=True)
class Translation:
    """One model directory as seen from each context."""

    mount: str  # the mount's name
    canonical: str
    local: str
    host: str
    container: str
    relative: str  # below the mount root ("" for the root itself)


def normalize(raw: object, *, field: str = "path") -> str:
    """The canonical form of ``raw``, or :class:`PathError` saying what is wrong.

    Accepts an absolute POSIX path of plain ASCII segments (one trailing slash is dropped);
    refuses relative paths, ``.``/``..`` segments, empty segments (``//``), control characters,
    anything Unicode normalization would change, non-ASCII look-alikes, and overlong input.
    """
    if not isinstance(raw, str):
        raise PathError(f"{field} must be text", field=field)
    if raw == "":
        raise PathError(
            f"{field} is empty: give an absolute path such as /ceph/models/my-model", field=field
        )
    if len(raw) > MAX_PATH_LENGTH:
        raise PathError(f"{field} is longer than {MAX_PATH_LENGTH} characters", field=field)
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in raw):
        raise PathError(
            f"{field} contains control characters (NUL, newline, tab...): remove them", field=field
        )
    if unicodedata.normalize("NFKC", raw) != raw:
        raise PathError(
            f"{field} contains characters that Unicode normalization changes (fullwidth slash...)",
            field=field,
        )
    if not raw.isascii():
        raise PathError(
            f"{field} must be plain ASCII: non-ASCII letters can imitate other paths", field=field
        )
    if raw != raw.strip():
        raise PathError(f"{field} starts or ends with spaces: remove them", field=field)
    if not raw.startswith("/"):
        raise PathError(
            f"{field} must be absolute (start with /), e.g. /ceph/models/my-model", field=field
        )
    body = raw[1:-1] if raw.endswith("/") and len(raw) > 1 else raw[1:]
    if body == "":
        raise PathError(f"{field} cannot be the filesystem root", field=field)
    for segment in body.split("/"):
        _check_segment(segment, field)
    return "/" + body


def _check_segment(segment: str, field: str) -> None:
    if segment == "":
        raise PathError(f"{field} has an empty segment (//): write single slashes", field=field)
    if segment in (".", ".."):
        raise PathError(
            f"{field} may not contain '{segment}' segments: write the full path", field=field
        )
    if len(segment) > MAX_SEGMENT_LENGTH:
        raise PathError(
            f"{field} has a segment longer than {MAX_SEGMENT_LENGTH} characters", field=field
        )
    if not _SEGMENT.match(segment):
        raise PathError(
            f"{field} segment {segment!r} may only use letters, digits, '.', '_' and '-', "
            "and may not start with '.' or '-'",
            field=field,
        )


def is_within(path: str, root: str) -> bool:
    """Whether normalized ``path`` is ``root`` or below it — by path segments, so
    ``/ceph/models-evil`` is not within ``/ceph/models``."""
    return posixpath.commonpath([root, path]) == root


def mount_for(path: str, mounts: Iterable[Mount], *, field: str = "path") -> Mount:
    """The mount whose canonical prefix contains ``path`` (the longest, if prefixes nest)."""
    matches = [mount for mount in mounts if is_within(path, mount.canonical)]
    if not matches:
        raise PathError(
            f"{field} {path} is not inside a registered storage mount; "
            "use a path under one of the mounts an admin has registered",
            field=field,
            code="path-outside-storage",
        )
    return max(matches, key=lambda mount: len(mount.canonical))


def translate(path: str, mount: Mount) -> Translation:
    """``path`` (canonical, inside ``mount``) as seen by Berth, the Docker daemon and vLLM."""
    if not is_within(path, mount.canonical):
        raise PathError(
            f"path {path} is not inside mount {mount.name} ({mount.canonical})",
            code="path-outside-storage",
        )
    relative = posixpath.relpath(path, mount.canonical)
    relative = "" if relative == "." else relative
    return Translation(
        mount=mount.name,
        canonical=path,
        local=_join(mount.local, relative),
        host=_join(mount.host, relative),
        container=_join(mount.container, relative),
        relative=relative,
    )


def _join(root: str, relative: str) -> str:
    return posixpath.join(root, relative) if relative else root


def resolve(raw: object, mounts: Iterable[Mount], *, field: str = "path") -> Translation:
    """Normalize ``raw``, find its mount and translate it: the one call every writer uses."""
    path = normalize(raw, field=field)
    return translate(path, mount_for(path, mounts, field=field))
