"""Memory on one GPU: weights split by tensor parallelism, the KV cache per token and per
sequence, and vLLM's per-GPU budget (weights, activation peak, non-torch memory, CUDA graphs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from deployments.planning.request import GIB, PlannerError, PlanRequest, WeightsSummary
from deployments.planning.shapes import MlaShape, ModelShape

# KV cache block size in tokens (CacheConfig.DEFAULT_BLOCK_SIZE); vLLM allocates whole blocks.
KV_BLOCK_SIZE = 16
# Vocabulary rows are padded to a multiple of 64 per tensor-parallel rank
# (DEFAULT_VOCAB_PADDING_SIZE, vllm/model_executor/layers/vocab_parallel_embedding.py).
VOCAB_PADDING = 64
# Default batching budgets of the API server by card size (EngineArgs defaults,
# vllm/engine/arg_utils.py ~2947-3039): (min GiB, max_num_batched_tokens, max_num_seqs). A100-80GB
# gets the small budget in vLLM; we cannot tell it from an H100 by memory alone and take the
# larger, which over-estimates its activation peak (the safe side).
DEFAULT_BATCHING_BY_GPU_GIB = ((160, 16384, 1024), (70, 8192, 1024), (0, 2048, 256))

# --- Overhead outside weights and KV cache (per GPU) ----------------------------------------------
# Non-torch memory (CUDA context pieces, cuBLAS workspaces) on one GPU: vLLM logged 0.10 GiB
# (A100-40GB, Llama-3-8B, vllm issue #12330) and 0.16 GiB (H100, 7B, gateway-api-inference-
# extension PR #550); 0.25 GiB leaves a margin.
NON_TORCH_BYTES = GIB // 4
# Added when TP > 1: NCCL and custom all-reduce buffers, 0.3-1.5 GiB in vLLM's start-up logs; we
# take 0.75 GiB, above the ~0.5 GiB a 70B at TP 4 reports.
TENSOR_PARALLEL_COMMUNICATION_BYTES = 3 * GIB // 4
# CUDA graphs, subtracted from the KV budget at profile time since vLLM 0.21
# (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1): "typically 0.3-0.5 GiB" in the "Graph capturing
# finished ... took X GiB" lines of vllm issues #20264 and #11005. Zero with --enforce-eager.
CUDA_GRAPH_BYTES = GIB // 2
# Activation peak of the profile run: one forward pass over max_num_batched_tokens tokens keeps a
# few hidden-size and intermediate-size tensors alive at once. These copy counts reproduce the
# 2.38 GiB peak vLLM logged for a 7B Llama-2-shaped model at the H100 defaults (8192 tokens,
# 1024 sequences; gateway-api-inference-extension PR #550).
ACTIVATION_HIDDEN_COPIES = 14
ACTIVATION_FFN_COPIES = 7
# The sampler holds float32 logits for max_num_seqs rows over the whole vocabulary (gathered
# across ranks) plus one working copy of the same size (vllm/v1/sample/sampler.py).
SAMPLER_LOGIT_BYTES = 4
SAMPLER_LOGIT_COPIES = 2

# --- dtypes ---------------------------------------------------------------------------------------
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
# vLLM's --kv-cache-dtype choices (CacheDType, vllm/config/cache.py line 44).
KV_CACHE_DTYPE_BYTES = {
    "bfloat16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1,
}  # fmt: skip


# =================================================================================================
# Weights
# =================================================================================================


class Split(StrEnum):
    """How a weight is divided among tensor-parallel ranks."""

    TENSOR = "tensor"  # column/row parallel: 1/t of the rows per rank
    KV_HEADS = "kv_heads"  # whole KV heads per rank, replicated when t > KV heads
    VOCAB = "vocab"  # vocabulary rows padded to a multiple of 64 per rank
    REPLICATED = "replicated"  # norms, routers, MLA down-projections: on every rank


@dataclass(frozen=True)
class WeightGroup:
    """``rows x row_parameters`` weights split one way; ``quantizable`` for linear layers."""

    name: str
    rows: int
    row_parameters: int
    split: Split
    quantizable: bool

    @property
    def parameters(self) -> int:
        """Parameters in the whole group, over all ranks."""
        return self.rows * self.row_parameters

    def rows_per_gpu(self, tp: int) -> int:
        """Rows one rank holds at tensor-parallel size ``tp``."""
        if self.split is Split.TENSOR:
            return -(-self.rows // tp)
        if self.split is Split.KV_HEADS:
            return max(1, self.rows // tp)
        if self.split is Split.VOCAB:
            return -(-self.rows // (VOCAB_PADDING * tp)) * VOCAB_PADDING
        return self.rows


def weight_groups(model: ModelShape) -> tuple[WeightGroup, ...]:
    """Every weight of the model, grouped by how tensor parallelism splits it."""
    return (
        *_embedding_groups(model),
        *_attention_groups(model),
        *_mlp_groups(model),
        *_moe_groups(model),
        WeightGroup("norms", model.num_layers * model.rules.norms_per_layer + 1,
                    model.hidden_size, Split.REPLICATED, quantizable=False),
    )  # fmt: skip


def _embedding_groups(model: ModelShape) -> list[WeightGroup]:
    embed = WeightGroup("embed_tokens", model.vocab_size, model.hidden_size, Split.VOCAB, False)
    if model.tie_word_embeddings:
        return [embed]
    return [embed, dataclasses.replace(embed, name="lm_head")]


def _attention_groups(model: ModelShape) -> list[WeightGroup]:
    if model.mla is not None:
        return _mla_groups(model, model.mla)
    layers, hidden, head_dim = model.num_layers, model.hidden_size, model.head_dim
    bias = 1 if model.rules.qkv_bias or model.attention_bias else 0
    width = model.num_attention_heads * head_dim
    groups = [
        WeightGroup("attention.q", layers * width, hidden + bias, Split.TENSOR, True),
        WeightGroup("attention.kv", model.num_kv_heads, layers * 2 * head_dim * (hidden + bias),
                    Split.KV_HEADS, True),
        WeightGroup("attention.o", layers * width, hidden, Split.TENSOR, True),
    ]  # fmt: skip
    if model.attention_bias:
        groups.append(WeightGroup("attention.o_bias", layers, hidden, Split.REPLICATED, False))
    if model.rules.qk_norm:
        groups.append(
            WeightGroup("attention.qk_norm", layers, 2 * head_dim, Split.REPLICATED, False)
        )
    return groups


def _mla_groups(model: ModelShape, mla: MlaShape) -> list[WeightGroup]:
    """MLA projections as vLLM shards them: the down-projections (q_a, kv_a) are replicated,
    the up-projections and o_proj split by heads."""
    layers, hidden, heads = model.num_layers, model.hidden_size, model.num_attention_heads
    q_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    groups = [
        WeightGroup("attention.kv_a", layers, hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim),
                    Split.REPLICATED, True),
        WeightGroup("attention.kv_a_norm", layers, mla.kv_lora_rank, Split.REPLICATED, False),
        WeightGroup("attention.kv_b", layers * heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                    mla.kv_lora_rank, Split.TENSOR, True),
        WeightGroup("attention.o", layers * heads * mla.v_head_dim, hidden, Split.TENSOR, True),
    ]  # fmt: skip
    if mla.q_lora_rank is None:
        return [WeightGroup("attention.q", layers * heads * q_head, hidden, Split.TENSOR, True),
                *groups]  # fmt: skip
    return [
        WeightGroup("attention.q_a", layers, hidden * mla.q_lora_rank, Split.REPLICATED, True),
        WeightGroup("attention.q_a_norm", layers, mla.q_lora_rank, Split.REPLICATED, False),
        WeightGroup("attention.q_b", layers * heads * q_head, mla.q_lora_rank, Split.TENSOR, True),
        *groups,
    ]


def _mlp_groups(model: ModelShape) -> list[WeightGroup]:
    layers = model.dense_layers
    if layers == 0:
        return []
    groups = [
        WeightGroup("mlp", layers * 3 * model.intermediate_size, model.hidden_size,
                    Split.TENSOR, True),
    ]  # fmt: skip
    if model.mlp_bias:
        width = 2 * model.intermediate_size + model.hidden_size
        groups.append(WeightGroup("mlp.bias", layers, width, Split.REPLICATED, False))
    return groups


def _moe_groups(model: ModelShape) -> list[WeightGroup]:
    moe, hidden = model.moe, model.hidden_size
    if moe is None or moe.moe_layers == 0:
        return []
    layers = moe.moe_layers
    groups = [
        WeightGroup("moe.experts", layers * moe.num_experts * 3 * moe.expert_intermediate_size,
                    hidden, Split.TENSOR, True),
        WeightGroup("moe.router", layers, hidden * moe.num_experts, Split.REPLICATED, False),
    ]  # fmt: skip
    if moe.shared_intermediate_size:
        groups.append(WeightGroup("moe.shared_experts", layers * 3 * moe.shared_intermediate_size,
                                  hidden, Split.TENSOR, True))  # fmt: skip
    if moe.shared_expert_gate:
        groups.append(
            WeightGroup("moe.shared_expert_gate", layers, hidden, Split.REPLICATED, False)
        )
    if moe.router_bias:
        groups.append(
            WeightGroup("moe.router_bias", layers, moe.num_experts, Split.REPLICATED, False)
        )
    return groups


def parameter_count_from_config(model: ModelShape) -> int:
    """Parameters the model loads (DeepSeek's multi-token-prediction layer is not loaded by a
    plain ``vllm serve`` and is not counted)."""
    return sum(group.parameters for group in weight_groups(model))


def model_dtype_bytes(dtype: str) -> int:
    """Bytes per unquantized weight and activation for ``--dtype``. ``auto`` is always 16-bit:
    bfloat16/float16 configs load as they are and float32 ones are downcast by vLLM."""
    if dtype == "auto":
        return 2
    if dtype not in MODEL_DTYPE_BYTES:
        raise PlannerError(f"unknown --dtype {dtype!r}; use auto, {', '.join(MODEL_DTYPE_BYTES)}")
    return MODEL_DTYPE_BYTES[dtype]


def checkpoint_dtype_bytes(model: ModelShape) -> int:
    """Bytes per unquantized weight in the checkpoint files, from the config's torch_dtype."""
    return MODEL_DTYPE_BYTES.get(model.torch_dtype, 2)


def group_bytes_per_parameter(model: ModelShape, group: WeightGroup, dtype_bytes: int) -> float:
    """Bytes per weight of one group: quantized linear layers at their packed size."""
    if group.quantizable:
        return model.quantization.linear_bytes_per_parameter(dtype_bytes)
    return dtype_bytes


@dataclass(frozen=True)
class ModelWeights:
    """Parameter count and bytes: loaded on GPUs, and read from storage."""

    parameter_count: int
    loaded_bytes: int
    checkpoint_bytes: int
    exact: bool
    dtype_bytes: int
    config_bytes: int  # the config-derived estimate of loaded_bytes, for scaling shards

    def per_gpu_bytes(self, model: ModelShape, tp: int) -> int:
        """One rank's share of the loaded weights; exact totals are split in the proportions
        the config gives (replicated norms, padded vocab, replicated KV heads)."""
        shard = sum(
            group.rows_per_gpu(tp) * group.row_parameters
            * group_bytes_per_parameter(model, group, self.dtype_bytes)
            for group in weight_groups(model)
        )  # fmt: skip
        return math.ceil(shard * self.loaded_bytes / self.config_bytes)


def _bytes_at(model: ModelShape, groups: Iterable[WeightGroup], dtype_bytes: int) -> int:
    return math.ceil(
        sum(g.parameters * group_bytes_per_parameter(model, g, dtype_bytes) for g in groups)
    )


def model_weights(
    model: ModelShape, dtype: str = "auto", summary: WeightsSummary | None = None
) -> ModelWeights:
    """Weights of the model at ``dtype``: exact from a WeightsSummary when given, otherwise
    computed from the config. Loaded bytes are what the GPUs hold (unquantized tensors cast to
    the model dtype); checkpoint bytes are what start-up reads from storage."""
    dtype_bytes = model_dtype_bytes(dtype)
    groups = weight_groups(model)
    parameters = sum(group.parameters for group in groups)
    estimate = _bytes_at(model, groups, dtype_bytes)
    if summary is None:
        on_disk = _bytes_at(model, groups, checkpoint_dtype_bytes(model))
        return ModelWeights(parameters, estimate, on_disk, False, dtype_bytes, estimate)
    if not summary.has_packed_integers:
        parameters = summary.parameter_count
    loaded = summary.weights_bytes
    if not model.quantization.quantized:
        loaded = parameters * dtype_bytes  # vLLM casts every float tensor to the model dtype
    return ModelWeights(parameters, loaded, summary.weights_bytes, True, dtype_bytes, estimate)


# =================================================================================================
# KV cache
# =================================================================================================


def kv_cache_dtype_bytes(kv_cache_dtype: str, dtype_bytes: int) -> int:
    """Bytes per cached element: ``auto`` follows the model dtype (vllm/config/cache.py)."""
    if kv_cache_dtype == "auto":
        return dtype_bytes
    if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        choices = ", ".join(KV_CACHE_DTYPE_BYTES)
        raise PlannerError(f"unknown --kv-cache-dtype {kv_cache_dtype!r}; use auto, {choices}")
    return KV_CACHE_DTYPE_BYTES[kv_cache_dtype]


def kv_bytes_per_token_per_layer(model: ModelShape, tp: int, element_bytes: int) -> int:
    """KV bytes one token costs in one layer on one rank. GQA: K and V for the rank's KV heads,
    at least one (heads are replicated when TP > KV heads). MLA: one latent of
    kv_lora_rank + rope dims, the same on every rank (not split by TP)."""
    if model.mla is not None:
        return (model.mla.kv_lora_rank + model.mla.qk_rope_head_dim) * element_bytes
    heads_per_gpu = max(1, model.num_kv_heads // tp)
    return 2 * heads_per_gpu * model.head_dim * element_bytes


def kv_bytes_per_token(model: ModelShape, element_bytes: int) -> int:
    """KV bytes one token costs in the whole model (all layers, TP 1), before any
    sliding-window cap."""
    return model.num_layers * kv_bytes_per_token_per_layer(model, 1, element_bytes)


def kv_bytes_for_sequence(
    model: ModelShape, tp: int, element_bytes: int, tokens: int, batched_tokens: int
) -> int:
    """KV cache one sequence of ``tokens`` needs on one rank, in whole blocks, as vLLM checks it
    (FullAttentionSpec / SlidingWindowSpec.max_memory_usage_bytes): full-attention layers hold
    every token; sliding layers at most window - 1 + batched tokens, plus one block."""
    page = KV_BLOCK_SIZE * kv_bytes_per_token_per_layer(model, tp, element_bytes)
    full_layers = model.num_layers - model.sliding_layers
    need = full_layers * -(-tokens // KV_BLOCK_SIZE) * page
    if model.sliding_layers and model.sliding_window:
        window_tokens = min(model.sliding_window - 1 + batched_tokens, tokens)
        need += model.sliding_layers * (-(-window_tokens // KV_BLOCK_SIZE) + 1) * page
    return need


def largest_sequence(
    model: ModelShape, tp: int, element_bytes: int, kv_budget: int, batched_tokens: int
) -> int:
    """The longest sequence (whole blocks, capped at the model's maximum) whose KV cache fits
    ``kv_budget`` on one rank; 0 when not even one block fits."""

    def fits(tokens: int) -> bool:
        need = kv_bytes_for_sequence(model, tp, element_bytes, tokens, batched_tokens)
        return need <= kv_budget

    if fits(model.max_model_len):
        return model.max_model_len
    low, high = 0, model.max_model_len // KV_BLOCK_SIZE
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle * KV_BLOCK_SIZE) else (low, middle - 1)
    return low * KV_BLOCK_SIZE


# =================================================================================================
# Per-GPU budget
# =================================================================================================


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory under a plan, for a bar split into weights / KV cache / overhead /
    headroom. ``kv_cache_bytes`` is what the budget leaves (0 when weights and overhead
    overflow it; ``shortfall_bytes`` says by how much)."""

    total_bytes: int
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int

    @property
    def overhead_bytes(self) -> int:
        """Activation peak + non-torch memory + CUDA graphs."""
        return self.activation_bytes + self.non_torch_bytes + self.cuda_graph_bytes

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache budget: what weights and overhead leave of the budget."""
        return max(0, self.budget_bytes - self.weights_bytes - self.overhead_bytes)

    @property
    def shortfall_bytes(self) -> int:
        """How far weights + overhead exceed the budget (0 when they fit)."""
        return max(0, self.weights_bytes + self.overhead_bytes - self.budget_bytes)

    @property
    def headroom_bytes(self) -> int:
        """Memory outside vLLM's budget (total x (1 - utilization)), left to everything else."""
        return max(0, self.total_bytes - self.budget_bytes)

    def segments(self) -> tuple[tuple[str, int], ...]:
        """(label, bytes) from the bottom of a bar to the top; weights and overhead are drawn
        as they are even when they overflow the card."""
        return (
            ("weights", self.weights_bytes),
            ("kv_cache", self.kv_cache_bytes),
            ("overhead", self.overhead_bytes),
            ("headroom", self.headroom_bytes),
        )

    def as_json(self) -> dict[str, int]:
        """The ``per_gpu`` object of ``manage.py plan --json``."""
        return {
            "budget_bytes": self.budget_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "overhead_bytes": self.overhead_bytes,
        }


def batching_budget(request: PlanRequest) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs): the request's, else vLLM's defaults for the card."""
    gib = request.gpu_memory_bytes / GIB
    _, tokens, seqs = next(row for row in DEFAULT_BATCHING_BY_GPU_GIB if gib >= row[0])
    return request.max_num_batched_tokens or tokens, request.max_num_seqs or seqs


def activation_peak_bytes(
    model: ModelShape, tp: int, request: PlanRequest, dtype_bytes: int
) -> int:
    """Peak activation memory of vLLM's profile run on one rank: a few hidden-wide and
    FFN-wide tensors per batched token, plus the sampler's float32 logits per sequence."""
    tokens, seqs = batching_budget(request)
    per_token = ACTIVATION_HIDDEN_COPIES * model.hidden_size + ACTIVATION_FFN_COPIES * -(
        -model.activation_ffn_width // tp
    )
    logits = seqs * model.vocab_size * SAMPLER_LOGIT_BYTES * SAMPLER_LOGIT_COPIES
    return tokens * per_token * dtype_bytes + logits


def gpu_memory(
    model: ModelShape, weights: ModelWeights, request: PlanRequest, tp: int
) -> GpuMemory:
    """One rank's budget and what weights and overhead take of it at tensor-parallel ``tp``."""
    communication = TENSOR_PARALLEL_COMMUNICATION_BYTES if tp > 1 else 0
    return GpuMemory(
        total_bytes=request.gpu_memory_bytes,
        budget_bytes=math.ceil(request.gpu_memory_bytes * request.gpu_memory_utilization),
        weights_bytes=weights.per_gpu_bytes(model, tp),
        activation_bytes=activation_peak_bytes(model, tp, request, weights.dtype_bytes),
        non_torch_bytes=NON_TORCH_BYTES + communication,
        cuda_graph_bytes=0 if request.enforce_eager else CUDA_GRAPH_BYTES,
    )
