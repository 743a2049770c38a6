"""The plan as a deployment keeps it (``Deployment.plan``): what the planner decided, typed, with
a version, and the one reader of the stored JSON::

    stored = StoredPlan.from_plan(result, gpu_memory_utilization=0.9)
    deployment.plan = stored.to_json()
    StoredPlan.from_json(deployment.plan).startup_estimate_s      # None for a CPU engine's {}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployments.planning.memory import GpuMemory
from deployments.planning.planner import Plan

STORED_PLAN_VERSION = 1


class StoredPlanError(ValueError):
    """The stored JSON is not a plan this code can read (an unknown version, a missing key)."""


@dataclass(frozen=True)
class StoredGpuMemory:
    """One GPU's memory under the plan, in bytes."""

    budget_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @classmethod
    def from_memory(cls, memory: GpuMemory) -> StoredGpuMemory:
        return cls(
            memory.budget_bytes, memory.weights_bytes, memory.kv_cache_bytes, memory.overhead_bytes
        )


@dataclass(frozen=True)
class StoredPlan:
    """What a deployment was planned with: the tensor-parallel size, the context, one GPU's
    memory, the reasons, and the start-up estimate the loading page shows."""

    parameter_count: int
    weights_bytes: int
    kv_bytes_per_token: int
    valid_tensor_parallel_sizes: tuple[int, ...]
    tensor_parallel_size: int | None
    fits: bool
    max_model_len: int
    max_model_len_supported: int
    per_gpu: StoredGpuMemory | None
    reasons: tuple[str, ...]
    suggestions: tuple[str, ...]
    startup_estimate_s: int
    health_start_period_s: int
    gpu_memory_utilization: float
    version: int = STORED_PLAN_VERSION

    @classmethod
    def from_plan(cls, plan: Plan, *, gpu_memory_utilization: float) -> StoredPlan:
        """The stored form of ``plan``, with the utilization the engine will be started with."""
        return cls(
            parameter_count=plan.parameter_count,
            weights_bytes=plan.weights_bytes,
            kv_bytes_per_token=plan.kv_bytes_per_token,
            valid_tensor_parallel_sizes=plan.valid_tensor_parallel_sizes,
            tensor_parallel_size=plan.tensor_parallel_size,
            fits=plan.fits,
            max_model_len=plan.max_model_len,
            max_model_len_supported=plan.max_model_len_supported,
            per_gpu=StoredGpuMemory.from_memory(plan.per_gpu) if plan.per_gpu else None,
            reasons=plan.reasons,
            suggestions=tuple(suggestion.message for suggestion in plan.suggestions),
            startup_estimate_s=plan.startup.total_s,
            health_start_period_s=plan.startup.health_start_period_s,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-native, for the deployment's ``plan`` column."""
        return {
            "version": self.version,
            "parameter_count": self.parameter_count,
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "valid_tensor_parallel_sizes": list(self.valid_tensor_parallel_sizes),
            "tensor_parallel_size": self.tensor_parallel_size,
            "fits": self.fits,
            "max_model_len": self.max_model_len,
            "max_model_len_supported": self.max_model_len_supported,
            "per_gpu": vars(self.per_gpu).copy() if self.per_gpu else None,
            "reasons": list(self.reasons),
            "suggestions": list(self.suggestions),
            "startup_estimate_s": self.startup_estimate_s,
            "health_start_period_s": self.health_start_period_s,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> StoredPlan | None:
        """The plan stored by :meth:`to_json`; None for no plan (``{}``: a CPU engine).
        Raises StoredPlanError for another version or a missing key."""
        if not data or data.get("mode") == "cpu":  # planning.cpu.CpuPlan reads those
            return None
        if data.get("version") != STORED_PLAN_VERSION:
            raise StoredPlanError(f"stored plan version {data.get('version')!r} is not readable")
        try:
            per_gpu = data["per_gpu"]
            return cls(
                parameter_count=int(data["parameter_count"]),
                weights_bytes=int(data["weights_bytes"]),
                kv_bytes_per_token=int(data["kv_bytes_per_token"]),
                valid_tensor_parallel_sizes=tuple(data["valid_tensor_parallel_sizes"]),
                tensor_parallel_size=data["tensor_parallel_size"],
                fits=bool(data["fits"]),
                max_model_len=int(data["max_model_len"]),
                max_model_len_supported=int(data["max_model_len_supported"]),
                per_gpu=StoredGpuMemory(**per_gpu) if per_gpu else None,
                reasons=tuple(data["reasons"]),
                suggestions=tuple(data["suggestions"]),
                startup_estimate_s=int(data["startup_estimate_s"]),
                health_start_period_s=int(data["health_start_period_s"]),
                gpu_memory_utilization=float(data["gpu_memory_utilization"]),
            )
        except (KeyError, TypeError) as exc:
            raise StoredPlanError(f"stored plan is missing or mistypes {exc}") from None
