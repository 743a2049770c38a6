"""One tensor-parallel size evaluated: vLLM's divisibility rules, one GPU's memory, the
longest context that fits, and why it fits or not, in numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deployments.planning.memory import (
    GpuMemory,
    ModelWeights,
    batching_budget,
    gpu_memory,
    kv_bytes_for_sequence,
    kv_cache_dtype_bytes,
    largest_sequence,
)
from deployments.planning.request import GIB, PlannerError, PlanRequest
from deployments.planning.shapes import ModelShape

# =================================================================================================
# Tensor-parallel rules
# =================================================================================================


def tensor_parallel_problems(model: ModelShape, tp: int, gpus_on_host: int) -> tuple[str, ...]:
    """Why vLLM would refuse tensor-parallel size ``tp`` for this model on a host with
    ``gpus_on_host`` GPUs (vllm/config/model.py, verify_with_parallel_config); empty when it is
    valid. Sizes that are not powers of two are valid exactly when every divisibility rule
    holds for them."""
    problems = [*_head_problems(model, tp), *_width_problems(model, tp)]
    if tp > gpus_on_host:
        problems.append(f"TP {tp} needs {tp} GPUs on one host; {gpus_on_host} available")
    return tuple(problems)


def _head_problems(model: ModelShape, tp: int) -> list[str]:
    heads, kv = model.num_attention_heads, model.num_kv_heads
    problems = []
    if heads % tp:
        problems.append(f"{heads} attention heads are not divisible by TP {tp}")
    if model.mla is None and (tp % kv if tp >= kv else kv % tp):
        problems.append(
            f"{kv} KV heads and TP {tp}: one must divide the other (vLLM shards or replicates "
            "whole KV heads)"
        )
    return problems


def _width_problems(model: ModelShape, tp: int) -> list[str]:
    widths = {"intermediate_size": model.intermediate_size if model.dense_layers else 0}
    if model.moe is not None:
        widths["moe_intermediate_size"] = model.moe.expert_intermediate_size
        widths["shared expert width"] = model.moe.shared_intermediate_size
    problems = [f"{name} {width} is not divisible by TP {tp}"
                for name, width in widths.items() if width and width % tp]  # fmt: skip
    group = model.quantization.group_size
    if group and not problems:
        problems += [
            f"{name} {width} / TP {tp} = {width // tp} is not a multiple of the quantization "
            f"group size {group} (vLLM: 'The input size is not aligned with the quantized "
            "weight shape')"
            for name, width in widths.items()
            if width and (width // tp) % group
        ]
    return problems


# =================================================================================================
# Evaluating one tensor-parallel size
# =================================================================================================


@dataclass(frozen=True)
class TensorParallelOption:
    """The outcome of one tensor-parallel size: its rule violations, the memory of one GPU, the
    longest context its KV cache holds, and whether the requested context fits."""

    tensor_parallel_size: int
    problems: tuple[str, ...]
    memory: GpuMemory
    kv_bytes_per_sequence: int  # KV one sequence of max_model_len needs on one GPU
    max_model_len_supported: int
    fits: bool
    reasons: tuple[str, ...]

    @property
    def valid(self) -> bool:
        """True when vLLM accepts this tensor-parallel size for the model."""
        return not self.problems


@dataclass(frozen=True)
class PlanContext:
    """What every evaluation of one request shares."""

    model: ModelShape
    weights: ModelWeights
    request: PlanRequest
    max_model_len: int
    kv_element_bytes: int


def plan_context(model: ModelShape, weights: ModelWeights, request: PlanRequest) -> PlanContext:
    if request.gpus_on_host < 1 or request.gpu_memory_bytes <= 0:
        raise PlannerError("need at least one GPU with a positive memory size")
    if not 0 < request.gpu_memory_utilization <= 1:
        raise PlannerError("gpu_memory_utilization must be in (0, 1]")
    if (request.max_model_len or 1) < 1 or (request.tensor_parallel_size or 1) < 1:
        raise PlannerError("max_model_len and the tensor-parallel size must be positive")
    return PlanContext(
        model=model,
        weights=weights,
        request=request,
        max_model_len=request.max_model_len or model.max_model_len,
        kv_element_bytes=kv_cache_dtype_bytes(request.kv_cache_dtype, weights.dtype_bytes),
    )


def evaluate(context: PlanContext, tp: int) -> TensorParallelOption:
    """Check ``tp`` against vLLM's rules and one GPU's memory."""
    model, request = context.model, context.request
    memory = gpu_memory(model, context.weights, request, tp)
    batched, _ = batching_budget(request)
    problems = tensor_parallel_problems(model, tp, request.gpus_on_host)
    need = kv_bytes_for_sequence(
        model, tp, context.kv_element_bytes, context.max_model_len, batched
    )
    supported = 0
    if not problems and memory.kv_cache_bytes > 0:
        supported = largest_sequence(
            model, tp, context.kv_element_bytes, memory.kv_cache_bytes, batched
        )
    fits = (
        not problems
        and memory.kv_cache_bytes >= need
        and context.max_model_len <= model.max_model_len
        and not _short_of_free_memory(request, memory)
    )
    option = TensorParallelOption(tp, problems, memory, need, supported, fits, ())
    return dataclasses.replace(option, reasons=_option_reasons(context, option))


def _short_of_free_memory(request: PlanRequest, memory: GpuMemory) -> bool:
    return request.gpu_free_bytes is not None and request.gpu_free_bytes < memory.budget_bytes


def in_gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def _option_reasons(context: PlanContext, option: TensorParallelOption) -> tuple[str, ...]:
    """Why one TP fits or not, in numbers."""
    tp, memory = option.tensor_parallel_size, option.memory
    if option.problems:
        return (f"TP {tp} is not valid: {'; '.join(option.problems)}",)
    budget = (
        f"the {in_gib(memory.budget_bytes)} budget ({in_gib(memory.total_bytes)} x "
        f"{context.request.gpu_memory_utilization:g})"
    )
    if memory.weights_bytes > memory.budget_bytes:
        return (f"TP {tp} refused: weights take {in_gib(memory.weights_bytes)} per GPU, more than "
                f"{budget}; vLLM would run out of memory loading them",)  # fmt: skip
    if memory.shortfall_bytes:
        return (f"TP {tp} refused: weights {in_gib(memory.weights_bytes)} + overhead "
                f"{in_gib(memory.overhead_bytes)} per GPU exceed {budget}, leaving no memory for "
                "the KV cache ('No available memory for the cache blocks')",)  # fmt: skip
    return _kv_reasons(context, option, budget)


def _kv_reasons(context: PlanContext, option: TensorParallelOption, budget: str) -> tuple[str, ...]:
    tp, memory, length = option.tensor_parallel_size, option.memory, context.max_model_len
    kv_left = (
        f"weights {in_gib(memory.weights_bytes)} + overhead {in_gib(memory.overhead_bytes)} leave "
        f"{in_gib(memory.kv_cache_bytes)} of {budget} for the KV cache per GPU"
    )
    reasons = []
    if length > context.model.max_model_len:
        reasons.append(f"TP {tp} refused: max_model_len {length} exceeds the model's maximum "
                       f"{context.model.max_model_len} ({context.model.max_model_len_source}); "
                       "vLLM refuses it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")  # fmt: skip
    elif memory.kv_cache_bytes < option.kv_bytes_per_sequence:
        reasons.append(f"TP {tp} refused: {kv_left}; one sequence of max_model_len {length} "
                       f"needs {in_gib(option.kv_bytes_per_sequence)}; the largest context "
                       f"that fits is {option.max_model_len_supported}")  # fmt: skip
    else:
        sequences = memory.kv_cache_bytes / max(1, option.kv_bytes_per_sequence)
        reasons.append(f"TP {tp} fits: {kv_left}, enough for {sequences:.1f} sequences of "
                       f"{length} tokens")  # fmt: skip
    if _short_of_free_memory(context.request, memory):
        reasons.append(f"TP {tp} refused: only {in_gib(context.request.gpu_free_bytes or 0)} free "
                       f"but the budget asks {in_gib(memory.budget_bytes)}; vLLM refuses to start "
                       "('Free memory on device ... is less than desired GPU memory "
                       "utilization')")  # fmt: skip
    return tuple(reasons)


def candidate_sizes(request: PlanRequest) -> tuple[int, ...]:
    """The tensor-parallel sizes to evaluate: 1..GPUs, or the one the request names."""
    if request.tensor_parallel_size is not None:
        return (request.tensor_parallel_size,)
    return tuple(range(1, request.gpus_on_host + 1))


def choose(
    context: PlanContext,
) -> tuple[tuple[TensorParallelOption, ...], TensorParallelOption | None]:
    """Every candidate's outcome, and the smallest valid TP that fits (None if none does)."""
    options = tuple(evaluate(context, tp) for tp in candidate_sizes(context.request))
    return options, next((option for option in options if option.fits), None)


def valid_sizes(model: ModelShape, gpus_on_host: int) -> tuple[int, ...]:
    """Every tensor-parallel size from 1 to ``gpus_on_host`` that vLLM accepts for the model."""
    return tuple(
        tp
        for tp in range(1, gpus_on_host + 1)
        if not tensor_parallel_problems(model, tp, gpus_on_host)
    )


def closest_option(options: tuple[TensorParallelOption, ...]) -> TensorParallelOption | None:
    """The option to show when nothing fits: the requested one, else the largest valid TP."""
    if len(options) == 1:
        return options[0]
    valid = [option for option in options if option.valid]
    return valid[-1] if valid else None
