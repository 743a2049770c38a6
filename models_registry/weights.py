"""Inspecting a model's weights: every safetensors header (never tensor data), the shard index,
and PyTorch ``.bin`` checkpoints, within limits that keep an inspection cheap enough for the
web request (:data:`MAX_SHARDS`, :data:`MAX_TOTAL_HEADER_BYTES`)."""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models_registry import strict_json
from models_registry.reading import (
    LFS_POINTER_MAX_BYTES,
    LFS_POINTER_PREFIX,
    Inspection,
    Severity,
    open_confined,
    read_json_file,
    unreadable,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on header size
# All headers of one model together, and how many shards are read at all: inspection runs in the
# web request (the register preview, on each keystroke). The largest published checkpoints stay
# far below both (about 25 MiB of headers over 163 shards for a 671B mixture of experts).
MAX_TOTAL_HEADER_BYTES = 64 * 1024 * 1024
MAX_SHARDS = 1024

# safetensors dtypes and their sizes in bytes; floating types hold parameters, the others are
# buffers (position ids, masks) or packed quantized integers.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset(name for name in DTYPE_BYTES if name.startswith(("F", "BF")))


def inspect_weights(report: Inspection, directory: Path) -> None:
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
    if len(shards) > MAX_SHARDS:
        report.add(
            "safetensors-too-many-shards",
            Severity.ERROR,
            f"{len(shards):,} .safetensors files; inspection reads at most {MAX_SHARDS} shards",
            "Point Berth at one model's directory: a checkpoint has tens to a few hundred shards.",
        )
        return
    parameters, total_bytes, by_dtype = 0, 0, Counter()
    tensors_by_shard: dict[str, set[str]] = {}
    complete, budget = True, _HeaderBudget()
    for name in shards:
        header = _read_safetensors_header(report, directory / name, budget)
        if header is None:
            complete = False
            if budget.exhausted:
                break
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


@dataclass
class _HeaderBudget:
    """Header bytes an inspection may still read (:data:`MAX_TOTAL_HEADER_BYTES` in all)."""

    left: int = MAX_TOTAL_HEADER_BYTES
    exhausted: bool = False


def _read_safetensors_header(
    report: Inspection, path: Path, budget: _HeaderBudget
) -> dict[str, dict[str, Any]] | None:
    """Tensor name -> dtype, element count and bytes, from the header alone."""
    name = path.name
    try:
        with open_confined(report, path) as handle:
            size = os.fstat(handle.fileno()).st_size
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
            if length == 0 or 8 + length > size:
                return _bad_header(
                    report, name, f"header length {length} does not fit the {size}-byte file"
                )
            if length > MAX_HEADER_BYTES:
                return _bad_header(
                    report,
                    name,
                    f"header length {length:,} bytes is over the safetensors format's limit of "
                    f"{MAX_HEADER_BYTES:,} bytes",
                )
            if length > budget.left:
                budget.exhausted = True
                return _headers_too_large(report, name)
            budget.left -= length
            raw = handle.read(length)
    except OSError as exc:
        return unreadable(report, name, exc)
    try:
        header = strict_json.loads(raw)
    except strict_json.StrictJsonError as exc:
        return _bad_header(report, name, f"the header holds an impossible number ({exc})")
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


def _headers_too_large(report: Inspection, name: str) -> None:
    report.add(
        "safetensors-headers-too-large",
        Severity.ERROR,
        f"the safetensors headers pass {MAX_TOTAL_HEADER_BYTES // 2**20} MiB in all at {name}; "
        "inspection stopped reading them there",
        "Check the shards: real checkpoints have headers of a few MiB in all (a corrupted or "
        "crafted file claims more).",
    )


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
    index = read_json_file(report, indexes[0], "index")
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
            try:
                with open_confined(report, directory / entry["name"]) as handle:
                    head = handle.read(len(LFS_POINTER_PREFIX))
            except OSError as exc:
                unreadable(report, entry["name"], exc)
                continue
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
