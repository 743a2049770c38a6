"""Read what the planner needs from a model directory: ``config.json`` and the exact weights
summary, which comes from the registry's inspection (safetensors headers, never tensor data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deployments.planning.request import PlannerError, WeightsSummary
from models_registry import strict_json
from models_registry.inspection import inspect_directory

# config.json larger than this is not a model config.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
WEIGHT_PROBLEMS = frozenset(
    {"safetensors-header-invalid", "weights-lfs-pointer", "file-unreadable"}
)


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; PlannerError when it is missing, too large, not JSON, not
    an object, or empty (an empty ``{}`` config is how lesson 1 of the field report began)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise PlannerError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        config = strict_json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlannerError(f"cannot read {path}: {exc.strerror}") from exc
    except strict_json.StrictJsonError as exc:
        raise PlannerError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlannerError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(config, dict) or not config:
        raise PlannerError(f"{path} is not a non-empty JSON object")
    return config


def read_weights_summary(directory: Path) -> WeightsSummary | None:
    """Exact parameter count, bytes and bytes per dtype from the safetensors headers in
    ``directory`` (the registry's inspection); None when there are no safetensors files;
    PlannerError when a shard's header cannot be read."""
    report = inspect_directory(directory)
    if report.weights_format != "safetensors":
        return None
    if report.parameter_count is None or report.weights_bytes is None:
        problems = [f.message for f in report.findings if f.code in WEIGHT_PROBLEMS]
        raise PlannerError("cannot count the weights: " + "; ".join(problems))
    return WeightsSummary(report.parameter_count, report.weights_bytes, dict(report.dtypes))
