"""What a deployment needs, in the terms of the deploy form: the GPUs a host really has, the GPU
count a request means, the context a model allows, and what the model would need on the GPUs
people commonly have — so the planner is visible on a machine without any::

    sizing.gpu_count_for(host, image, None)   # 0 for a CPU image on a host without GPUs
    sizing.on_common_gpus(model, args)        # [CommonFit(24, plan), CommonFit(48, …), …]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

from deployments import planning
from deployments.runtime.engine_args import EngineArgs

MIB = 1024**2
GIB = 1024**3
# One card of the sizes teams most often have: 24 GiB (RTX 4090, A10G, L4), 48 GiB (L40S,
# RTX 6000 Ada, A40) and 80 GiB (A100 80GB, H100).
COMMON_GPU_GIB = (24, 48, 80)
LONG_CONTEXT_SWITCH = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def host_gpus(host: Any) -> list[Any]:
    """The GPUs the host's agent last saw, with a memory size."""
    return [gpu for gpu in host.gpus.all() if gpu.present and gpu.memory_total_mib]


def gpu_count_for(host: Any, image: Any, requested: int | None) -> int | None:
    """The GPU count a request means. Empty means "the planner chooses" — except for a
    CPU-capable image on a host without GPUs, where the only thing that can run is 0."""
    if requested is None and image.cpu_capable and not host_gpus(host):
        return 0
    return requested


def no_gpus_refusal(host: Any, image: Any) -> ValidationError:
    """Why GPUs cannot be planned on ``host``, with the fix that applies to this image."""
    if image.cpu_capable:
        fix = f"set GPUs to 0 ({image.name} runs on CPUs)"
        return ValidationError({"gpu_count": f"{host.name} reports no GPUs: {fix}"})
    fix = "pick another host or a CPU-capable image"
    return ValidationError(
        {"host": f"{host.name} reports no GPUs and {image.name} needs them: {fix}"}
    )


def check_context_length(model: Any, max_model_len: int | None, environment: dict) -> None:
    """vLLM refuses a ``--max-model-len`` above what the model's config allows (unless told
    ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``): refuse it here, naming the field and the limit."""
    if max_model_len is None or environment.get(LONG_CONTEXT_SWITCH) == "1":
        return
    try:
        shape = planning.model_from_config(model.config or {})
    except planning.PlannerError:
        return  # the model's own check says what is wrong with its config
    if max_model_len > shape.max_model_len:
        limit = f"{shape.max_model_len} ({shape.max_model_len_source})"
        message = (
            f"{max_model_len} tokens is longer than this model's maximum, {limit}; vLLM refuses "
            f"it unless {LONG_CONTEXT_SWITCH}=1 is set"
        )
        raise ValidationError({"max_model_len": message})


def weights_summary(model: Any) -> planning.WeightsSummary | None:
    """Exact counts from the registry's inspection, when it read safetensors headers."""
    if model.parameter_count and model.weights_bytes:
        return planning.WeightsSummary(
            model.parameter_count, model.weights_bytes, dict(model.dtypes)
        )
    return None


def plan_request(
    args: EngineArgs, gpu_memory_bytes: int, gpus_on_host: int, tensor_parallel_size: int | None
) -> planning.PlanRequest:
    """The planner's request for GPUs of one size, with the form's engine settings."""
    return planning.PlanRequest(
        gpu_memory_bytes=gpu_memory_bytes,
        gpus_on_host=gpus_on_host,
        gpu_memory_utilization=args.gpu_memory_utilization
        or planning.DEFAULT_GPU_MEMORY_UTILIZATION,
        max_model_len=args.max_model_len,
        dtype=args.dtype or "auto",
        kv_cache_dtype=args.kv_cache_dtype or "auto",
        tensor_parallel_size=tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
    )


@dataclass(frozen=True)
class CommonFit:
    """The plan for the model on one card of ``gib`` GiB."""

    gib: int
    plan: planning.Plan


def on_common_gpus(model: Any, args: EngineArgs) -> list[CommonFit]:
    """The model's plan on one 24, 48 and 80 GiB card each (empty when it cannot be
    planned): what it needs, shown also where the chosen host has no GPU."""
    fits = []
    for gib in COMMON_GPU_GIB:
        request = plan_request(args, gib * GIB, 1, None)
        try:
            plan = planning.plan(model.config, request, weights_summary(model))
        except planning.PlannerError:
            return []
        fits.append(CommonFit(gib, plan))
    return fits
