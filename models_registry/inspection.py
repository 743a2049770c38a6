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
import json
import math
import os
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
LFS_POINTER_MAX_BYTES = 1024  # pointer files are ~130 bytes; real weights are megabytes
MAX_JSON_BYTES = 64 * 1024 * 1024  # config/tokenizer JSON larger than this is not plausible
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on header size
MAX_FILES = 10_000  # per directory tree: a model is tens of files, not a dataset

# safetensors dtypes and their sizes in bytes; floating types hold parameters, the others are
# buffers (position ids, masks) or packed quantized integers.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset(name for name in DTYPE_BYTES if name.startswith(("F", "BF")))


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


def inspect_directory(
    directory: Path, *, storage_root: Path | None = None, display_path: str | None = None
) -> Inspection:
    """Inspect ``directory``; with ``storage_root``, symlinks resolving outside it are errors."""
    report = Inspection(path=display_path or str(directory))
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
    report.files = [_file_entry(entry) for entry in entries if not entry.is_dir()]
    report.fingerprint = fingerprint(entries)
    if storage_root is not None:
        _check_symlinks(report, directory, storage_root.resolve())
    _inspect_config(report, directory)
    _inspect_tokenizer(report, directory)
    _inspect_weights(report, directory)
    return report


def _check_location(report: Inspection, directory: Path, storage_root: Path | None) -> bool:
    if storage_root is not None and not _inside(directory.resolve(), storage_root.resolve()):
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


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([root, path]) == str(root)


def _file_entry(entry: os.DirEntry) -> dict[str, Any]:
    try:
        size = entry.stat().st_size
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
            if path.is_symlink() and not _inside(path.resolve(), root):
                relative = path.relative_to(directory)
                report.add(
                    "symlink-escapes-storage",
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
    config = _read_json_file(report, path, "config")
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


def _read_json_file(report: Inspection, path: Path, kind: str) -> dict[str, Any] | None:
    """The file's JSON object, or None after adding the matching finding."""
    name = path.name
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            report.add(
                f"{kind}-invalid",
                Severity.ERROR,
                f"{name} is {size:,} bytes, too large for JSON metadata",
                f"Restore the original {name}.",
            )
            return None
        raw = path.read_bytes()
    except OSError as exc:
        report.add(
            "file-unreadable",
            Severity.ERROR,
            f"cannot read {name}: {exc.strerror}",
            "Fix the file's permissions or the broken link.",
        )
        return None
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
        value = json.loads(raw)
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
    fast_ok = _present(fast) and _read_json_file(report, fast, "tokenizer") is not None
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
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(len(LFS_POINTER_PREFIX))
    except OSError as exc:
        report.add(
            "file-unreadable",
            Severity.ERROR,
            f"cannot read {path.name}: {exc.strerror}",
            "Fix the file's permissions or the broken link.",
        )
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
    config = _read_json_file(report, path, "tokenizer")
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


# --- weights --------------------------------------------------------------------------------


def _inspect_weights(report: Inspection, directory: Path) -> None:
    names = {entry["name"] for entry in report.files}
    safetensors = sorted(name for name in names if name.endswith(".safetensors"))
    pickles = sorted(
        name for name in names if name.endswith(".bin") and name.startswith("pytorch_model")
    )
    if safetensors:
        report.weights_format = "safetensors"
        _inspect_safetensors(report, directory, safetensors)
    elif pickles:
        report.weights_format = "pytorch-bin"
        _inspect_pickles(report, directory, pickles)
    else:
        report.add(
            "weights-missing",
            Severity.ERROR,
            "no weights: no *.safetensors or pytorch_model*.bin files",
            "Download the weights into the directory (`git lfs pull` if it is a git clone).",
        )


def _inspect_safetensors(report: Inspection, directory: Path, shards: list[str]) -> None:
    parameters, total_bytes, by_dtype = 0, 0, Counter()
    tensors_by_shard: dict[str, set[str]] = {}
    complete = True
    for name in shards:
        header = _read_safetensors_header(report, directory / name)
        if header is None:
            complete = False
            continue
        tensors_by_shard[name] = set(header)
        for tensor in header.values():
            size = tensor["bytes"]
            total_bytes += size
            by_dtype[tensor["dtype"]] += size
            if tensor["dtype"] in FLOAT_DTYPES:
                parameters += tensor["elements"]
    _check_index(report, directory, shards, tensors_by_shard)
    report.dtypes = dict(by_dtype)
    if complete:
        report.parameter_count = parameters
        report.weights_bytes = total_bytes


def _read_safetensors_header(report: Inspection, path: Path) -> dict[str, dict[str, Any]] | None:
    """Tensor name -> dtype, element count and bytes, from the header alone."""
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if prefix.startswith(LFS_POINTER_PREFIX[:8]) and size <= LFS_POINTER_MAX_BYTES:
                report.add(
                    "weights-lfs-pointer",
                    Severity.ERROR,
                    f"{name} is a Git LFS pointer ({size} bytes), not weights",
                    "Run `git lfs pull` in the model directory to fetch the real weights.",
                )
                return None
            if len(prefix) < 8:
                return _bad_header(
                    report, name, "the file is shorter than the 8-byte header length"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                return _bad_header(
                    report, name, f"header length {length} does not fit the {size}-byte file"
                )
            raw = handle.read(length)
    except OSError as exc:
        report.add(
            "file-unreadable",
            Severity.ERROR,
            f"cannot read {name}: {exc.strerror}",
            "Fix the file's permissions or the broken link.",
        )
        return None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _bad_header(report, name, f"the header is not JSON ({exc})")
    if not isinstance(header, dict):
        return _bad_header(report, name, "the header is not a JSON object")
    return _parse_tensors(report, name, header, data_bytes=size - 8 - length)


def _parse_tensors(
    report: Inspection, name: str, header: dict[str, Any], *, data_bytes: int
) -> dict | None:
    tensors: dict[str, dict[str, Any]] = {}
    for tensor_name, info in header.items():
        if tensor_name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            elements = math.prod(int(dim) for dim in shape)
        except (KeyError, TypeError, ValueError):
            return _bad_header(
                report, name, f"tensor {tensor_name!r} lacks a valid dtype, shape or data_offsets"
            )
        if dtype not in DTYPE_BYTES:
            return _bad_header(report, name, f"tensor {tensor_name!r} has unknown dtype {dtype!r}")
        expected = math.ceil(elements * DTYPE_BYTES[dtype])
        if (
            not (isinstance(start, int) and isinstance(end, int))
            or end - start != expected
            or not 0 <= start <= end <= data_bytes
        ):
            return _bad_header(
                report,
                name,
                f"tensor {tensor_name!r} offsets {start}..{end} do not match its "
                f"shape and dtype or run past the end of the file (truncated download?)",
            )
        tensors[tensor_name] = {"dtype": dtype, "elements": elements, "bytes": expected}
    return tensors


def _bad_header(report: Inspection, name: str, why: str) -> None:
    report.add(
        "safetensors-header-invalid",
        Severity.ERROR,
        f"{name}: {why}",
        "Download the file again; a truncated or corrupted shard cannot be loaded.",
    )


def _check_index(
    report: Inspection, directory: Path, shards: list[str], tensors_by_shard: dict[str, set[str]]
) -> None:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if not indexes:
        if len(shards) > 1:
            report.add(
                "index-missing",
                Severity.WARNING,
                f"{len(shards)} shards but no *.safetensors.index.json",
                "Copy model.safetensors.index.json from the original checkpoint.",
            )
        return
    index = _read_json_file(report, indexes[0], "index")
    weight_map = index.get("weight_map") if index else None
    if not isinstance(weight_map, dict):
        if index is not None:
            report.add(
                "index-invalid",
                Severity.ERROR,
                f"{indexes[0].name} has no weight_map",
                f"Restore the original {indexes[0].name}.",
            )
        return
    for shard in sorted(set(weight_map.values()) - set(shards)):
        report.add(
            "shard-missing",
            Severity.ERROR,
            f"{shard} is listed in {indexes[0].name} but not on disk",
            "Download the missing shard (an interrupted download leaves gaps).",
        )
    lost = [
        tensor
        for tensor, shard in weight_map.items()
        if shard in tensors_by_shard and tensor not in tensors_by_shard[shard]
    ]
    if lost:
        report.add(
            "shard-missing",
            Severity.ERROR,
            f"{len(lost)} tensors listed in {indexes[0].name} are not in their shards "
            f"(e.g. {lost[0]})",
            "Download the shards again: they do not match the index.",
        )
    for shard in sorted(set(shards) - set(weight_map.values())):
        report.add(
            "shard-unreferenced",
            Severity.WARNING,
            f"{shard} is on disk but not in {indexes[0].name}",
            "Remove the stray file or restore the matching index; vLLM may load it anyway.",
        )


def _inspect_pickles(report: Inspection, directory: Path, files: list[str]) -> None:
    sizes = [entry["bytes"] or 0 for entry in report.files if entry["name"] in files]
    for entry in report.files:
        if entry["name"] in files and (entry["bytes"] or 0) <= LFS_POINTER_MAX_BYTES:
            head = (directory / entry["name"]).read_bytes()[: len(LFS_POINTER_PREFIX)]
            if head == LFS_POINTER_PREFIX:
                report.add(
                    "weights-lfs-pointer",
                    Severity.ERROR,
                    f"{entry['name']} is a Git LFS pointer, not weights",
                    "Run `git lfs pull` in the model directory to fetch the real weights.",
                )
    report.weights_bytes = sum(sizes)
    report.add(
        "weights-pickle-only",
        Severity.WARNING,
        f"only PyTorch .bin weights ({len(files)} files, {report.weights_bytes:,} bytes): "
        "pickle files can run code when loaded, and the exact parameter count is unknown "
        "(the planner estimates it from config.json)",
        "Prefer a safetensors export of the checkpoint.",
    )
