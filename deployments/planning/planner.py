"""The deployment planner: memory per GPU, the smallest valid tensor-parallel size, the context
that fits, and how long the model will take to start.

Pure functions over a model's ``config.json`` (a mapping) and, when the model directory has been
inspected, the exact numbers from its safetensors headers. No Django: the deploy form, the
``manage.py plan`` command, the benchmarks and a plain Python shell all call ``plan()``::

    from deployments.planning import GIB, PlanRequest, plan

    request = PlanRequest(gpu_memory_bytes=40 * GIB, gpus_on_host=4, max_model_len=8192)
    result = plan(config, request)
    result.tensor_parallel_size     # 4
    result.per_gpu.segments()       # weights / KV cache / overhead / headroom, for one bar per GPU
    result.reasons                  # why TP 1 and 2 were refused, in GiB

The memory model mirrors vLLM's V1 engine (vllm/v1/worker/gpu_worker.py): a per-GPU budget of
``total x gpu_memory_utilization`` holds the weight shard, the activation peak of the profile run,
non-torch memory (NCCL, cuBLAS) and CUDA graphs; what is left is the KV cache, which must hold at
least one sequence of ``max_model_len``. Estimates err on the large side: a plan that fits here
should fit in vLLM; one refused here may sometimes have fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployments.planning.memory import (
    GpuMemory,
    ModelWeights,
    kv_bytes_per_token,
    model_weights,
)
from deployments.planning.options import (
    TensorParallelOption,
    choose,
    closest_option,
    plan_context,
    valid_sizes,
)
from deployments.planning.request import PlanRequest, WeightsSummary
from deployments.planning.shapes import ModelShape, model_from_config
from deployments.planning.startup import StartupEstimate, startup_estimate
from deployments.planning.suggestions import Suggestion, suggestions


@dataclass(frozen=True)
class Plan:
    """A deployment plan: the chosen tensor-parallel size (None when nothing fits), one GPU's
    memory at that size (or at the TP evaluated when nothing fits), every candidate's outcome,
    reasons and suggestions in numbers, and the start-up timers."""

    model: ModelShape
    parameter_count: int
    parameters_exact: bool
    weights_bytes: int
    checkpoint_bytes: int
    kv_bytes_per_token: int
    valid_tensor_parallel_sizes: tuple[int, ...]
    tensor_parallel_size: int | None
    fits: bool
    max_model_len: int
    max_model_len_supported: int
    per_gpu: GpuMemory | None
    per_gpu_tensor_parallel_size: int | None
    options: tuple[TensorParallelOption, ...]
    reasons: tuple[str, ...]
    suggestions: tuple[Suggestion, ...]
    startup: StartupEstimate

    def as_json(self) -> dict[str, Any]:
        """The stable JSON shape of ``manage.py plan --json`` (issue 5, item 6)."""
        return {
            "parameter_count": self.parameter_count,
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "valid_tensor_parallel_sizes": list(self.valid_tensor_parallel_sizes),
            "tensor_parallel_size": self.tensor_parallel_size,
            "fits": self.fits,
            "max_model_len": self.max_model_len,
            "max_model_len_supported": self.max_model_len_supported,
            "per_gpu": self.per_gpu.as_json() if self.per_gpu else None,
            "reasons": list(self.reasons),
            "suggestions": [suggestion.message for suggestion in self.suggestions],
            "startup_estimate_s": self.startup.total_s,
            "health_start_period_s": self.startup.health_start_period_s,
        }


def plan(
    config: Mapping[str, Any], request: PlanRequest, summary: WeightsSummary | None = None
) -> Plan:
    """Plan a deployment of the model ``config`` describes on ``request``'s GPUs.

    Picks the smallest valid tensor-parallel size whose GPUs hold the weights, the overhead and
    one sequence of max_model_len in the KV cache (or evaluates ``request.tensor_parallel_size``
    when given). Raises PlannerError for configs or flags it cannot plan."""
    model = model_from_config(config)
    weights = model_weights(model, request.dtype, summary)
    context = plan_context(model, weights, request)
    options, chosen = choose(context)
    reference = chosen or closest_option(options)
    return Plan(
        model=model,
        parameter_count=weights.parameter_count,
        parameters_exact=weights.exact and not (summary and summary.has_packed_integers),
        weights_bytes=weights.loaded_bytes,
        checkpoint_bytes=weights.checkpoint_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model, context.kv_element_bytes),
        valid_tensor_parallel_sizes=valid_sizes(model, request.gpus_on_host),
        tensor_parallel_size=chosen.tensor_parallel_size if chosen else None,
        fits=chosen is not None,
        max_model_len=context.max_model_len,
        max_model_len_supported=reference.max_model_len_supported if reference else 0,
        per_gpu=reference.memory if reference else None,
        per_gpu_tensor_parallel_size=reference.tensor_parallel_size if reference else None,
        options=options,
        reasons=_plan_reasons(model, weights, options, chosen),
        suggestions=() if chosen else suggestions(context, reference),
        startup=startup_estimate(weights.checkpoint_bytes, request),
    )


def _plan_reasons(
    model: ModelShape,
    weights: ModelWeights,
    options: tuple[TensorParallelOption, ...],
    chosen: TensorParallelOption | None,
) -> tuple[str, ...]:
    """The outcome of every TP up to the chosen one (all of them when nothing fits), after any
    note on how the numbers were obtained."""
    notes = []
    if not model.known_family:
        notes.append(f"model_type {model.model_type or '(missing)'!r} is not one of the modelled "
                     "families; counted as a Llama-style decoder")  # fmt: skip
    if not weights.exact:
        notes.append("parameters and weight bytes computed from config.json (no safetensors "
                     "headers read)")  # fmt: skip
    shown = options
    if chosen is not None:
        shown = tuple(o for o in options if o.tensor_parallel_size <= chosen.tensor_parallel_size)
    return (*notes, *(reason for option in shown for reason in option.reasons))
