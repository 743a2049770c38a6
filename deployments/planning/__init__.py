"""Planning a deployment, pure (no Django): ``planner`` puts together the model's shape
(``shapes``), memory per GPU (``memory``), each tensor-parallel size's outcome (``options``),
what to change when nothing fits (``suggestions``) and the start-up timers (``startup``)::

    from deployments.planning import GIB, PlanRequest, plan

    result = plan(config, PlanRequest(gpu_memory_bytes=40 * GIB, gpus_on_host=4))
"""

from __future__ import annotations

from deployments.planning.memory import GpuMemory, parameter_count_from_config
from deployments.planning.planner import Plan, plan
from deployments.planning.request import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_READ_BYTES_PER_SECOND,
    GIB,
    PlannerError,
    PlanRequest,
    WeightsSummary,
)
from deployments.planning.shapes import ModelShape, model_from_config
from deployments.planning.startup import StartupEstimate
from deployments.planning.suggestions import Suggestion

__all__ = [
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_READ_BYTES_PER_SECOND",
    "GIB",
    "GpuMemory",
    "ModelShape",
    "Plan",
    "PlanRequest",
    "PlannerError",
    "StartupEstimate",
    "Suggestion",
    "WeightsSummary",
    "model_from_config",
    "parameter_count_from_config",
    "plan",
]
