"""The CPU plan: host memory for vLLM's CPU engine (``docker/vllm-cpu/``), pure.

On CPUs vLLM does not profile a memory budget the way it does on GPUs: the KV cache is a fixed
size, ``VLLM_CPU_KVCACHE_SPACE`` GiB (the engine logs "Explicitly set (1.0/23.54) GiB for KV
cache"), beside the weights and the engine's own processes. Berth sizes that space for the
context asked for, caps the container's memory at the sum, and refuses a plan the host's
unreserved memory cannot hold::

    result = plan_cpu(config, CpuPlanRequest(host_memory_bytes=24 * GIB, free_bytes=16 * GIB))
    result.kv_cache_space_gib     # the VLLM_CPU_KVCACHE_SPACE value
    result.memory_limit_bytes     # the container's --memory
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from deployments.planning.memory import (
    kv_bytes_for_sequence,
    kv_cache_dtype_bytes,
    model_weights,
)
from deployments.planning.request import GIB, WeightsSummary
from deployments.planning.shapes import derived_max_model_len, model_from_config

# Resident memory of vLLM 0.32's CPU engine around the model: API server, engine core and worker
# processes with torch, the compiled graph and its buffers. Measured on the tiny model as the
# container's peak usage minus the KV space (about 2.4 GiB); rounded up.
ENGINE_RUNTIME_BYTES = 3 * GIB
MIN_KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
# Sequences the default KV space holds at the planned context: room for a few requests at once
# without letting a long context claim the host.
DEFAULT_CONCURRENT_SEQUENCES = 4
MODE = "cpu"
CPU_PLAN_VERSION = 1


class CpuPlanError(ValueError):
    """The stored JSON is not a CPU plan this code can read."""


@dataclass(frozen=True)
class CpuPlanRequest:
    """The host's memory and what the user asks for."""

    host_memory_bytes: int | None  # MemTotal as the host's agent reported it; None: unknown
    free_bytes: int | None  # what the host may still give CPU deployments (after reservations)
    max_model_len: int | None = None
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    kv_cache_space_gib: int | None = None  # the user's own VLLM_CPU_KVCACHE_SPACE
    sequences: int = DEFAULT_CONCURRENT_SEQUENCES
    # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: vLLM then accepts a context above the model's own.
    allow_long_context: bool = False


@dataclass(frozen=True)
class CpuPlan:
    """Host memory for one CPU deployment, and whether the host can give it; stored in
    ``Deployment.plan`` as :meth:`to_json` (``"mode": "cpu"``), read back by :meth:`from_json`."""

    fits: bool
    max_model_len: int
    weights_bytes: int
    kv_bytes_per_sequence: int
    kv_cache_space_gib: int
    runtime_bytes: int
    memory_limit_bytes: int
    reasons: tuple[str, ...]
    task: str = "generate"  # or "embed" (models_registry.tasks): the runner the engine gets

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CPU_PLAN_VERSION, "mode": MODE, **asdict(self),
            "reasons": list(self.reasons),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> CpuPlan | None:
        """The CPU plan stored by :meth:`to_json`; None when ``data`` is not one (a GPU plan, or
        none). Raises CpuPlanError for another version or a missing key."""
        if not data or data.get("mode") != MODE:
            return None
        if data.get("version") != CPU_PLAN_VERSION:
            raise CpuPlanError(f"stored CPU plan version {data.get('version')!r} is not readable")
        try:
            return cls(
                **{key: data[key] for key in _FIELDS if key != "reasons"},
                reasons=tuple(data["reasons"]),
            )
        except (KeyError, TypeError) as exc:
            raise CpuPlanError(f"stored CPU plan is missing or mistypes {exc}") from None


_FIELDS = tuple(field.name for field in fields(CpuPlan))


def plan_cpu(
    config: Mapping[str, Any],
    request: CpuPlanRequest,
    summary: WeightsSummary | None = None,
    *,
    task: str = "generate",
) -> CpuPlan:
    """Weights + KV space + the engine's runtime = the container's memory limit; it fits when the
    host's free memory holds it. Raises PlannerError for a config the planner cannot read."""
    model = model_from_config(config)
    derived, key = derived_max_model_len(config)
    max_model_len = request.max_model_len or derived
    reasons: list[str] = []
    if max_model_len > derived and not request.allow_long_context:
        reasons.append(f"--max-model-len {max_model_len} exceeds the model's {key} ({derived})")
    weights = model_weights(model, request.dtype, summary)
    element = kv_cache_dtype_bytes(request.kv_cache_dtype, weights.dtype_bytes)
    per_sequence = kv_bytes_for_sequence(model, 1, element, max_model_len, max_model_len)
    space = request.kv_cache_space_gib or max(
        MIN_KV_SPACE_GIB, math.ceil(per_sequence * request.sequences / GIB)
    )
    if per_sequence > space * GIB:
        reasons.append(
            f"one sequence of {max_model_len} tokens needs {per_sequence / GIB:.2f} GiB of KV "
            f"cache; VLLM_CPU_KVCACHE_SPACE={space} GiB holds less"
        )
    limit = weights.loaded_bytes + space * GIB + ENGINE_RUNTIME_BYTES
    reasons += _host_reasons(request, limit)
    return CpuPlan(
        fits=not reasons,
        max_model_len=max_model_len,
        weights_bytes=weights.loaded_bytes,
        kv_bytes_per_sequence=per_sequence,
        kv_cache_space_gib=space,
        runtime_bytes=ENGINE_RUNTIME_BYTES,
        memory_limit_bytes=limit,
        reasons=tuple(reasons),
        task=task,
    )


def _host_reasons(request: CpuPlanRequest, limit: int) -> list[str]:
    if request.host_memory_bytes is None or request.free_bytes is None:
        return ["the host's memory is unknown: its agent has not reported yet"]
    if limit > request.free_bytes:
        return [
            f"needs {limit / GIB:.1f} GiB of host memory (weights, "
            f"KV cache, engine) but {request.free_bytes / GIB:.1f} GiB of the host's "
            f"{request.host_memory_bytes / GIB:.1f} GiB is free for CPU deployments"
        ]
    return []
