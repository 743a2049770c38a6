"""Inspecting a model directory before anything is launched from it.

Reads only what it must: ``config.json``, the tokenizer files, and the JSON header of each
``.safetensors`` file (8-byte little-endian length, then JSON; tensor data is never read). It
never creates, changes or "repairs" a file. Each problem becomes a :class:`Finding` with a code,
a severity, a message and a remedy; a directory with any error cannot be deployed::

    report = inspect_directory(Path("/fsx/models/team-a/llama"), storage_root=Path("/fsx/models"))
    report.ok, report.parameter_count, [f.code for f in report.findings]
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from models_registry.reading import (
    ESCAPE,
    LFS_POINTER_MAX_BYTES,
    LFS_POINTER_PREFIX,
    Finding,
    Inspection,
    Severity,
    inside,
    open_confined,
    read_json_file,
    unreadable,
)
from models_registry.weights import (
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    MAX_SHARDS,
    MAX_TOTAL_HEADER_BYTES,
    inspect_weights,
)

__all__ = [
    "DTYPE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_SHARDS",
    "MAX_TOTAL_HEADER_BYTES",
    "Finding",
    "Inspection",
    "Severity",
    "fingerprint",
    "inspect_directory",
]

CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
MAX_FILES = 10_000  # per directory tree: a model is tens of files, not a dataset


def inspect_directory(
    directory: Path, *, storage_root: Path | None = None, display_path: str | None = None
) -> Inspection:
    """Inspect ``directory``; with ``storage_root``, symlinks resolving outside it are errors
    and nothing behind them is read (not even their sizes)."""
    report = Inspection(
        path=display_path or str(directory),
        confinement=storage_root.resolve() if storage_root is not None else None,
    )
    if not _check_location(report, directory, storage_root):
        return report
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        report.add(
            "path-unreadable",
            Severity.ERROR,
            f"cannot list {report.path}: {exc.strerror}",
            "Give Berth's service account read and execute permission on the directory.",
        )
        return report
    report.files = [
        _file_entry(entry, report.confinement) for entry in entries if not entry.is_dir()
    ]
    report.fingerprint = fingerprint(entries)
    if report.confinement is not None:
        _check_symlinks(report, directory, report.confinement)
        if any(finding.code == ESCAPE for finding in report.findings):
            return report  # read nothing behind a link that leaves the team's storage
    _inspect_config(report, directory)
    _inspect_tokenizer(report, directory)
    inspect_weights(report, directory)
    return report


def _check_location(report: Inspection, directory: Path, storage_root: Path | None) -> bool:
    if storage_root is not None and not inside(directory.resolve(), storage_root.resolve()):
        report.add(
            "path-outside-storage",
            Severity.ERROR,
            f"{report.path} resolves to {directory.resolve()}, "
            f"outside the storage mount {storage_root}",
            "Register the model's real directory under a storage mount, not a link to elsewhere.",
        )
        return False
    if not directory.is_dir():
        report.add(
            "path-not-found",
            Severity.ERROR,
            f"{report.path} does not exist or is not a directory",
            "Check the path for typos and that the storage is mounted on this machine.",
        )
        return False
    return True


def _present(path: Path) -> bool:
    """Exists, or is a link (a dangling link is reported as unreadable, not as missing)."""
    return path.exists() or path.is_symlink()


def _file_entry(entry: os.DirEntry, confinement: Path | None) -> dict[str, Any]:
    try:
        escapes = (
            confinement is not None
            and entry.is_symlink()
            and not inside(Path(entry.path).resolve(), confinement)
        )
        size = None if escapes else entry.stat().st_size
    except OSError:
        size = None
    return {"name": entry.name, "bytes": size, "symlink": entry.is_symlink()}


def fingerprint(entries: list[os.DirEntry]) -> str:
    """A digest of the top-level files' names, sizes and modification times: changes when a
    file is added, removed, replaced or rewritten. Sync uses it to skip unchanged models."""
    digest = hashlib.sha256()
    for entry in entries:
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check_symlinks(report: Inspection, directory: Path, root: Path) -> None:
    seen = 0
    for current, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in [*dirnames, *filenames]:
            seen += 1
            if seen > MAX_FILES:
                report.add(
                    "too-many-files",
                    Severity.WARNING,
                    f"more than {MAX_FILES} files under {report.path}",
                    "Point Berth at the model directory itself, not a folder of models.",
                )
                return
            path = Path(current, name)
            if path.is_symlink() and not inside(path.resolve(), root):
                relative = path.relative_to(directory)
                report.add(
                    ESCAPE,
                    Severity.ERROR,
                    f"{relative} links to {os.readlink(path)}, outside the storage mount",
                    "Replace the link with the file itself, or a link that stays inside the mount.",
                )


# --- config.json ----------------------------------------------------------------------------


def _inspect_config(report: Inspection, directory: Path) -> None:
    path = directory / CONFIG
    if not _present(path):
        report.add(
            "config-missing",
            Severity.ERROR,
            f"{CONFIG} is missing",
            "Copy config.json from the original checkpoint; never create a placeholder.",
        )
        return
    config = read_json_file(report, path, "config")
    if config is None:
        return
    report.config = config
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        report.architecture = architectures[0]
    if isinstance(model_type, str):
        report.model_type = model_type
    if report.architecture is None and report.model_type is None:
        report.add(
            "config-invalid",
            Severity.ERROR,
            f"{CONFIG} names no architectures and no model_type",
            "Restore the original config.json: vLLM picks the model class from these fields.",
        )


# --- tokenizer ------------------------------------------------------------------------------


def _inspect_tokenizer(report: Inspection, directory: Path) -> None:
    fast = directory / TOKENIZER_JSON
    sentencepiece = directory / TOKENIZER_MODEL
    present = [
        name
        for name in (TOKENIZER_JSON, TOKENIZER_MODEL, TOKENIZER_CONFIG)
        if _present(directory / name)
    ]
    report.tokenizer = {"kind": None, "files": present}
    fast_ok = _present(fast) and read_json_file(report, fast, "tokenizer") is not None
    sentencepiece_ok = _present(sentencepiece) and _binary_file_ok(report, sentencepiece)
    if fast_ok or sentencepiece_ok:
        report.tokenizer["kind"] = "tokenizers" if fast_ok else "sentencepiece"
    elif not _present(fast) and not _present(sentencepiece):
        report.add(
            "tokenizer-missing",
            Severity.ERROR,
            f"neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL} is present",
            "Copy the tokenizer from the original checkpoint (for Llama: original/tokenizer.model, "
            "or tokenizer.json); without it vLLM fails with `TypeError: not a string`.",
        )
    _inspect_tokenizer_config(report, directory)


def _binary_file_ok(report: Inspection, path: Path) -> bool:
    try:
        with open_confined(report, path) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(len(LFS_POINTER_PREFIX))
    except OSError as exc:
        unreadable(report, path.name, exc)
        return False
    if size == 0:
        report.add(
            "tokenizer-empty",
            Severity.ERROR,
            f"{path.name} is empty",
            f"Copy the original {path.name}.",
        )
        return False
    if head == LFS_POINTER_PREFIX and size <= LFS_POINTER_MAX_BYTES:
        report.add(
            "tokenizer-empty",
            Severity.ERROR,
            f"{path.name} is a Git LFS pointer, not the file itself",
            "Run `git lfs pull` in the model directory.",
        )
        return False
    return True


def _inspect_tokenizer_config(report: Inspection, directory: Path) -> None:
    path = directory / TOKENIZER_CONFIG
    if not _present(path):
        report.add(
            "tokenizer-missing",
            Severity.ERROR,
            f"{TOKENIZER_CONFIG} is missing",
            f"Copy {TOKENIZER_CONFIG} from the original checkpoint; never create a placeholder.",
        )
        return
    config = read_json_file(report, path, "tokenizer")
    if config is None:
        return
    has_template = bool(config.get("chat_template")) or any(
        (directory / name).exists() for name in CHAT_TEMPLATE_FILES
    )
    if not has_template:
        report.add(
            "chat-template-missing",
            Severity.WARNING,
            "no chat template (tokenizer_config.json or chat_template.jinja)",
            "Base models have none: /v1/chat/completions will refuse requests. "
            "Use /v1/completions, "
            "or deploy with a chat template an admin approved.",
        )
