"""Concrete changes that make a plan fit when the request does not: another tensor-parallel
size, a shorter context, an fp8 KV cache, a higher utilization, more or larger GPUs, a
quantized checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.planning.memory import ModelWeights, model_weights
from deployments.planning.options import (
    PlanContext,
    TensorParallelOption,
    choose,
    closest_option,
    in_gib,
    plan_context,
)
from deployments.planning.request import GIB, PlanRequest
from deployments.planning.shapes import ModelShape, Quantization, integer_quantization

# The highest utilisation we suggest: what is left (~5%) is the CUDA context outside PyTorch's
# view, allocator fragmentation and monitoring agents; 0.95 is the value users report running at
# (vllm issue #20305), and what a 70B at TP 4 on 40 GB cards needs to hold a useful context.
SUGGESTED_MAX_GPU_MEMORY_UTILIZATION = 0.95
# Card sizes offered in "larger GPUs" suggestions: L4/A10 24, A100 40, L40S 48, A100/H100 80,
# H100 NVL 94, H200 141, B200 180 (GiB as the cards report them, rounded).
COMMON_GPU_MEMORY_GIB = (24, 40, 48, 80, 94, 141, 180)
# Tensor-parallel sizes tried when suggesting more GPUs (one host rarely has more than 8; NVL
# systems reach 16 or more).
MAX_SUGGESTED_TENSOR_PARALLEL_SIZE = 16


@dataclass(frozen=True)
class Suggestion:
    """A concrete change that makes the plan fit (or fit better), with the numbers."""

    kind: str
    message: str
    changes: Mapping[str, Any] = field(default_factory=dict)


def _fitting_option(
    model: ModelShape, weights: ModelWeights, request: PlanRequest
) -> TensorParallelOption | None:
    return choose(plan_context(model, weights, request))[1]


def _outcome(
    context: PlanContext, **changes: Any
) -> tuple[TensorParallelOption | None, TensorParallelOption | None]:
    """(the option that fits, the closest one) for the request with ``changes`` applied."""
    request = dataclasses.replace(context.request, **changes)
    options, chosen = choose(plan_context(context.model, context.weights, request))
    return chosen, closest_option(options)


def suggestions(
    context: PlanContext, reference: TensorParallelOption | None
) -> tuple[Suggestion, ...]:
    """Concrete alternatives when the request does not fit: the largest context that fits,
    an fp8 KV cache, a higher utilization, more GPUs, larger GPUs, a quantized checkpoint."""
    found = [
        _another_tensor_parallel_size(context),
        _shorterplan_context(context, reference),
        _fp8_kv_cache(context, reference),
        _higher_utilization(context, reference),
        _more_gpus(context),
        _larger_gpus(context),
        *_quantized_checkpoints(context),
    ]
    return tuple(suggestion for suggestion in found if suggestion is not None)


def _another_tensor_parallel_size(context: PlanContext) -> Suggestion | None:
    """When the user named a TP that does not fit, the smallest one that does."""
    if context.request.tensor_parallel_size is None:
        return None
    chosen, _ = _outcome(context, tensor_parallel_size=None)
    if chosen is None:
        return None
    tp = chosen.tensor_parallel_size
    return Suggestion(
        "tensor_parallel_size",
        f"Use --tensor-parallel-size {tp}: max_model_len {context.max_model_len} fits there "
        f"with {in_gib(chosen.memory.kv_cache_bytes)} of KV cache per GPU",
        {"tensor_parallel_size": tp},
    )


def _shorterplan_context(
    context: PlanContext, reference: TensorParallelOption | None
) -> Suggestion | None:
    if reference is None or reference.max_model_len_supported <= 0:
        return None
    length, tp = reference.max_model_len_supported, reference.tensor_parallel_size
    return Suggestion(
        "max_model_len",
        f"Set --max-model-len {length}: the largest context that fits at TP {tp} "
        f"(max_model_len {context.max_model_len} needs "
        f"{in_gib(reference.kv_bytes_per_sequence)} of KV cache per GPU, "
        f"{in_gib(reference.memory.kv_cache_bytes)} is left)",
        {"max_model_len": length, "tensor_parallel_size": tp},
    )


def _fp8_kv_cache(
    context: PlanContext, reference: TensorParallelOption | None
) -> Suggestion | None:
    if context.kv_element_bytes <= 1:
        return None
    chosen, closest = _outcome(context, kv_cache_dtype="fp8")
    return _variant_suggestion(
        context, reference, chosen, closest, "kv_cache_dtype", "fp8",
        "Use --kv-cache-dtype fp8 (it halves the KV cache)",
    )  # fmt: skip


def _higher_utilization(
    context: PlanContext, reference: TensorParallelOption | None
) -> Suggestion | None:
    target = SUGGESTED_MAX_GPU_MEMORY_UTILIZATION
    if context.request.gpu_memory_utilization >= target:
        return None
    chosen, closest = _outcome(context, gpu_memory_utilization=target)
    return _variant_suggestion(
        context, reference, chosen, closest, "gpu_memory_utilization", target,
        f"Raise --gpu-memory-utilization to {target} (if nothing else uses the GPUs)",
    )  # fmt: skip


def _variant_suggestion(
    context: PlanContext,
    reference: TensorParallelOption | None,
    chosen: TensorParallelOption | None,
    closest: TensorParallelOption | None,
    flag: str,
    value: Any,
    action: str,
) -> Suggestion | None:
    """A flag change that makes the plan fit, or at least lengthens the context that fits."""
    if chosen is not None:
        tp = chosen.tensor_parallel_size
        return Suggestion(
            flag,
            f"{action}: max_model_len {context.max_model_len} then fits at TP {tp}",
            {flag: value, "tensor_parallel_size": tp},
        )
    before = reference.max_model_len_supported if reference else 0
    if closest is None or closest.max_model_len_supported <= before:
        return None
    tp, after = closest.tensor_parallel_size, closest.max_model_len_supported
    return Suggestion(
        flag,
        f"{action}: the largest context at TP {tp} grows from {before} to {after} tokens "
        f"(still short of {context.max_model_len})",
        {flag: value, "max_model_len": after, "tensor_parallel_size": tp},
    )


def _more_gpus(context: PlanContext) -> Suggestion | None:
    request = context.request
    for tp in range(request.gpus_on_host + 1, MAX_SUGGESTED_TENSOR_PARALLEL_SIZE + 1):
        bigger = dataclasses.replace(request, gpus_on_host=tp, tensor_parallel_size=tp)
        option = _fitting_option(context.model, context.weights, bigger)
        if option is not None:
            return Suggestion(
                "gpu_count",
                f"Use {tp} GPUs of {in_gib(request.gpu_memory_bytes)} at TP {tp}: max_model_len "
                f"{context.max_model_len} fits with {in_gib(option.memory.kv_cache_bytes)} of KV "
                "cache per GPU",
                {"gpu_count": tp, "tensor_parallel_size": tp},
            )
    return None


def _larger_gpus(context: PlanContext) -> Suggestion | None:
    request = context.request
    for gib in COMMON_GPU_MEMORY_GIB:
        if gib * GIB <= request.gpu_memory_bytes:
            continue
        larger = dataclasses.replace(request, gpu_memory_bytes=gib * GIB, gpu_free_bytes=None)
        option = _fitting_option(context.model, context.weights, larger)
        if option is not None:
            tp = option.tensor_parallel_size
            return Suggestion(
                "gpu_memory",
                f"Use GPUs with {gib} GiB: max_model_len {context.max_model_len} fits at TP {tp} "
                f"({tp} GPU{'s' if tp > 1 else ''})",
                {"gpu_memory_gib": gib, "tensor_parallel_size": tp},
            )
    return None


QUANTIZED_ALTERNATIVES = (
    ("an FP8", Quantization("fp8", 8)),
    ("an AWQ/GPTQ int4 (group 128)", integer_quantization("awq", 4, 128)),
)


def _quantized_checkpoints(context: PlanContext) -> list[Suggestion]:
    model = context.model
    if model.quantization.quantized:
        return []
    found = []
    for label, quantization in QUANTIZED_ALTERNATIVES:
        quantized = dataclasses.replace(model, quantization=quantization)
        weights = model_weights(quantized, context.request.dtype)
        option = _fitting_option(quantized, weights, context.request)
        if option is not None:
            tp = option.tensor_parallel_size
            found.append(Suggestion(
                "quantization",
                f"Use {label} checkpoint of the model (~{in_gib(weights.loaded_bytes)} of "
                f"weights): max_model_len {context.max_model_len} fits at TP {tp}",
                {"quantization": quantization.method, "tensor_parallel_size": tp},
            ))  # fmt: skip
    return found
