"""What an inspection reads a member's files into, and how it reads them.

The report (:class:`Inspection` with its :class:`Finding` list), the one way a file is opened
(:func:`open_confined`: links resolved by the kernel at open time must stay in the team's
storage), and JSON metadata parsed strictly (``models_registry.strict_json``). Used by
``inspection`` (config, tokenizer) and ``weights`` (safetensors headers, pickles).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from models_registry import strict_json

ESCAPE = "symlink-escapes-storage"
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
LFS_POINTER_MAX_BYTES = 1024  # pointer files are ~130 bytes; real weights are megabytes
MAX_JSON_BYTES = 64 * 1024 * 1024  # config/tokenizer JSON larger than this is not plausible


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    remedy: str


@dataclass
class Inspection:
    """What a model directory holds, and what is wrong with it."""

    path: str
    architecture: str | None = None
    model_type: str | None = None
    parameter_count: int | None = None
    weights_bytes: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)  # bytes of tensor data per dtype
    weights_format: str | None = None  # "safetensors", "pytorch-bin" or None
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": None, "files": []})
    files: list[dict[str, Any]] = field(default_factory=list)  # top-level files: name, bytes
    findings: list[Finding] = field(default_factory=list)
    fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    # Where every file read must really be (links resolved at open time); None: anywhere.
    confinement: Path | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when nothing would stop a launch (warnings allowed)."""
        return not any(finding.severity == Severity.ERROR for finding in self.findings)

    def add(self, code: str, severity: Severity, message: str, remedy: str) -> None:
        self.findings.append(Finding(code, severity, message, remedy))

    def as_json(self) -> dict[str, Any]:
        """The stable JSON shape of ``manage.py inspect_model --json``."""
        return {
            "path": self.path,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "parameter_count": self.parameter_count,
            "weights_bytes": self.weights_bytes,
            "dtypes": dict(sorted(self.dtypes.items())),
            "tokenizer": {"kind": self.tokenizer["kind"], "files": list(self.tokenizer["files"])},
            "findings": [
                {**asdict(finding), "severity": str(finding.severity)} for finding in self.findings
            ],
            "ok": self.ok,
        }


def inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([root, path]) == str(root)


class Escaped(OSError):
    """A file that, links resolved when it was opened, is outside the confinement."""


def open_confined(report: Inspection, path: Path) -> BinaryIO:
    """Open ``path`` for reading and check where it really is *after* opening it (the kernel's
    name for the open file), so a link swapped between a check and the read cannot lend this
    inspection another team's file. Raises :class:`Escaped` (an ``OSError``) when outside."""
    handle = path.open("rb")
    if report.confinement is not None:
        try:
            real = Path(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
        except OSError:
            real = path.resolve()  # no /proc: resolve after opening, the best left
        if not inside(real, report.confinement):
            handle.close()
            report.add(
                ESCAPE,
                Severity.ERROR,
                f"{path.name} leads to {real}, outside the storage it must stay in",
                "Replace the link with the file itself, or a link that stays inside the mount.",
            )
            raise Escaped(errno.EACCES, "outside the storage")
    return handle


def unreadable(report: Inspection, name: str, exc: OSError) -> None:
    """The finding for a file that could not be read (none more when it led outside)."""
    if not isinstance(exc, Escaped):
        report.add(
            "file-unreadable",
            Severity.ERROR,
            f"cannot read {name}: {exc.strerror}",
            "Fix the file's permissions or the broken link.",
        )


def read_json_file(report: Inspection, path: Path, kind: str) -> dict[str, Any] | None:
    """The file's JSON object, or None after adding the matching finding."""
    name = path.name
    try:
        with open_confined(report, path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_JSON_BYTES:
                report.add(
                    f"{kind}-invalid",
                    Severity.ERROR,
                    f"{name} is {size:,} bytes, too large for JSON metadata",
                    f"Restore the original {name}.",
                )
                return None
            raw = handle.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        return unreadable(report, name, exc)
    empty_code = f"{kind}-empty"
    if raw.startswith(LFS_POINTER_PREFIX):
        report.add(
            empty_code,
            Severity.ERROR,
            f"{name} is a Git LFS pointer, not the file itself",
            "Run `git lfs pull` in the model directory (or download the file again).",
        )
        return None
    if not raw.strip():
        report.add(
            empty_code,
            Severity.ERROR,
            f"{name} is empty",
            f"Copy the original {name}; an empty file makes vLLM fail at start-up.",
        )
        return None
    try:
        value = strict_json.loads(raw)
    except strict_json.StrictJsonError as exc:
        report.add(
            f"{kind}-invalid",
            Severity.ERROR,
            f"{name}: {exc}",
            f"Restore the original {name}: no model config holds such a number.",
        )
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.add(
            f"{kind}-invalid",
            Severity.ERROR,
            f"{name} is not valid JSON ({exc})",
            f"Restore the original {name}.",
        )
        return None
    if not isinstance(value, dict):
        report.add(
            f"{kind}-invalid",
            Severity.ERROR,
            f"{name} holds a {type(value).__name__}, not a JSON object",
            f"Restore the original {name}.",
        )
        return None
    if not value:
        report.add(
            empty_code,
            Severity.ERROR,
            f"{name} is an empty object {{}}",
            f"Copy the original {name}: placeholder '{{}}' files crash vLLM "
            "(TypeError: not a string).",
        )
        return None
    return value
