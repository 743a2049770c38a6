"""The deployment planner: memory per GPU, the smallest valid tensor-parallel size, the context
that fits, and how long the model will take to start.

Pure functions over a model's ``config.json`` (a mapping) and, when the model directory has been
inspected, the exact numbers from its safetensors headers. No Django: the deploy form, the
``manage.py plan`` command, the benchmarks and a plain Python shell all call ``plan()``::

    from deployments.planner import GIB, PlanRequest, plan

    result = plan(config, PlanRequest(gpu_memory_bytes=40 * GIB, gpu_count=4, max_model_len=8192))
    result.tensor_parallel_size     # 4
    result.per_gpu.segments()       # weights / KV cache / overhead / headroom, for one bar per GPU
    result.reasons                  # why TP 1 and 2 were refused, in GiB

The memory model mirrors vLLM's V1 engine (``shared/reference/vllm.md`` §3): a per-GPU budget of
``total x gpu_memory_utilization`` holds the weight shard, the activation peak of the profile run,
non-torch memory (NCCL, cuBLAS) and CUDA graphs; what is left is the KV cache, which must hold at
least one sequence of ``max_model_len``. Estimates err on the large side: a plan that fits here
should fit in vLLM; one refused here may sometimes have fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

GIB = 1024**3

# --- vLLM's own defaults and layout rules ---------------------------------------------------------
# vLLM 0.33's default (vllm/config/cache.py line 215); it was 0.9 for most of vLLM's life.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# The highest utilisation we suggest: what is left (~5%) is the CUDA context outside PyTorch's
# view, allocator fragmentation and monitoring agents; 0.95 is the value users report running at
# (vllm issue #20305) and the one vllm.md §3.2's worked example proposes.
SUGGESTED_MAX_GPU_MEMORY_UTILIZATION = 0.95
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
# Added when TP > 1: NCCL and custom all-reduce buffers, 0.3-1.5 GiB per vllm.md §3.2; we take
# 0.75 GiB, above the ~0.5 GiB of its worked 70B example.
TENSOR_PARALLEL_COMMUNICATION_BYTES = 3 * GIB // 4
# CUDA graphs, subtracted from the KV budget at profile time since vLLM 0.21
# (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1): "typically 0.3-0.5 GiB" in the "Graph capturing
# finished ... took X GiB" lines of vllm issues #20264 and #11005. Zero with --enforce-eager.
CUDA_GRAPH_BYTES = GIB // 2
# Activation peak of the profile run: one forward pass over max_num_batched_tokens tokens keeps a
# few hidden-size and intermediate-size tensors alive at once. These copy counts reproduce the
# 2.38 GiB peak vLLM logged for a 7B Llama-2-shaped model at the H100 defaults (8192 tokens,
# 1024 sequences; gateway-api-inference-extension PR #550, quoted in performance.md §1.1).
ACTIVATION_HIDDEN_COPIES = 14
ACTIVATION_FFN_COPIES = 7
# The sampler holds float32 logits for max_num_seqs rows over the whole vocabulary (gathered
# across ranks) plus one working copy of the same size (vllm.md §3.3).
SAMPLER_LOGIT_BYTES = 4
SAMPLER_LOGIT_COPIES = 2

# --- Start-up (shared/reference/performance.md §1) ------------------------------------------------
# Sequential read throughput assumed for the checkpoint: shared storage as in the field report,
# where 140 GB took 10-15 min (155-235 MB/s, performance.md §0). Configurable per request: local
# Gen4 NVMe reads ~7 GB/s and a warm page cache is faster still.
DEFAULT_READ_BYTES_PER_SECOND = 200 * 10**6
# Process start, imports, engine init and memory profiling: 34 s warm to 94 s cold on 8B
# (vllm issue #20264; tensorfuse's Llama-3.1-8B cold start).
ENGINE_INIT_S = 90
# Dynamo ~15 s + Inductor ~70 s on Llama-70B (vllm issue #19824); 52 s cold on 8B (tensorfuse).
TORCH_COMPILE_S = 90
# CUDA-graph capture: ~60 s on Llama-70B TP=8 (vllm issue #19824), 54 s cold on 8B (tensorfuse).
CUDA_GRAPH_CAPTURE_S = 60
# transformers' save_pretrained default max_shard_size ("5GB"): the loader logs one progress line
# per shard, so a shard's read time is the longest silence while loading.
DEFAULT_SHARD_BYTES = 5 * 10**9
# The health check's start period is the estimate with this margin, never below the 120 s start
# period of the image whose restart loop the field report describes (lesson 7).
HEALTH_START_PERIOD_MARGIN = 1.5
MIN_HEALTH_START_PERIOD_S = 120
# A load is stalled after this many times its longest silent phase without a progress line.
STALL_TIMEOUT_MARGIN = 3
MIN_STALL_TIMEOUT_S = 300
# vLLM's default VLLM_ENGINE_READY_TIMEOUT_S (vllm/envs.py); we never set less.
VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S = 600
ENGINE_READY_TIMEOUT_MARGIN = 2

# Card sizes offered in "larger GPUs" suggestions: L4/A10 24, A100 40, L40S 48, A100/H100 80,
# H100 NVL 94, H200 141, B200 180 (GiB as the cards report them, rounded).
COMMON_GPU_MEMORY_GIB = (24, 40, 48, 80, 94, 141, 180)
# Tensor-parallel sizes tried when suggesting more GPUs (one host rarely has more than 8; NVL
# systems reach 16 or more).
MAX_SUGGESTED_TENSOR_PARALLEL_SIZE = 16

# --- dtypes ---------------------------------------------------------------------------------------
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
# vLLM's --kv-cache-dtype choices (CacheDType, vllm/config/cache.py line 44).
KV_CACHE_DTYPE_BYTES = {
    "bfloat16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1,
}  # fmt: skip

# Config keys vLLM reads for the model's maximum length (derive_max_model_len_and_key).
MAX_LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip
# Aliases vLLM accepts (CONFIG_FIELD_ALIASES, vllm/transformers_utils/config.py line 56).
KV_HEAD_KEYS = (
    "num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num",
    "num_attention_groups",
)  # fmt: skip
EXPERT_COUNT_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")
EXPERTS_PER_TOKEN_KEYS = (
    "num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_topk", "moe_top_k",
    "top_k",
)  # fmt: skip


# Integer tensors above this share of a checkpoint's bytes are packed quantized weights; below it
# they are buffers (position ids, masks) some checkpoints carry.
PACKED_INTEGER_SHARE = 0.01


class PlannerError(ValueError):
    """The inputs cannot be planned: a config without the fields the planner needs, an unknown
    dtype, a non-positive GPU count. The message names the field and is fit to show a user."""


# =================================================================================================
# Inputs
# =================================================================================================


@dataclass(frozen=True)
class WeightsSummary:
    """Exact figures from a checkpoint's safetensors headers (``models_registry.inspection``
    produces them): floating-point elements, bytes of tensor data, and bytes per dtype."""

    parameter_count: int
    weights_bytes: int
    dtypes: Mapping[str, int] = field(default_factory=dict)

    @property
    def has_packed_integers(self) -> bool:
        """True when integer tensors hold packed quantized weights (AWQ/GPTQ), so the float
        element count is not the model's parameter count."""
        integers = sum(size for dtype, size in self.dtypes.items() if dtype.startswith(("I", "U")))
        return integers > self.weights_bytes * PACKED_INTEGER_SHARE


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for: the cards (size and count on one host) and the engine flags."""

    gpu_memory_bytes: int
    gpu_count: int
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    gpu_free_bytes: int | None = None
    read_bytes_per_second: float = DEFAULT_READ_BYTES_PER_SECOND


# =================================================================================================
# The model, as read from config.json
# =================================================================================================


@dataclass(frozen=True)
class FamilyRules:
    """Where a decoder family departs from the Llama layout."""

    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over q and k heads
    norms_per_layer: int = 2  # Gemma 2/3 add pre/post feed-forward norms
    tie_default: bool = False  # what a missing tie_word_embeddings means for the family


FAMILIES = {
    "llama": FamilyRules(),
    "mistral": FamilyRules(),
    "mixtral": FamilyRules(),
    "phi3": FamilyRules(),
    "qwen2": FamilyRules(qkv_bias=True),
    "qwen2_moe": FamilyRules(qkv_bias=True),
    "qwen3": FamilyRules(qk_norm=True),
    "qwen3_moe": FamilyRules(qk_norm=True),
    "gemma": FamilyRules(tie_default=True),
    "gemma2": FamilyRules(norms_per_layer=4, tie_default=True),
    "gemma3_text": FamilyRules(qk_norm=True, norms_per_layer=4, tie_default=True),
    "deepseek_v2": FamilyRules(),
    "deepseek_v3": FamilyRules(),
}


@dataclass(frozen=True)
class MlaShape:
    """DeepSeek-style multi-head latent attention: one compressed latent is cached per token."""

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoeShape:
    """Mixture-of-experts layers: routed experts, optional shared experts, dense-first layers."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # total width of the shared expert(s); 0 when there is none
    shared_expert_gate: bool  # Qwen2-MoE gates its shared expert with a 1-wide linear layer
    router_bias: bool  # DeepSeek-V3's e_score_correction_bias
    moe_layers: int


@dataclass(frozen=True)
class Quantization:
    """How linear-layer weights are stored. Embeddings, norms, routers and lm_head stay 16-bit."""

    method: str = "none"
    weight_bits: int = 16
    group_size: int | None = None  # int4 group or fp8 block width along the input dimension
    scale_bytes_per_weight: float = 0.0

    @property
    def quantized(self) -> bool:
        """True when linear weights are stored in fewer bits than the model dtype."""
        return self.method != "none"

    def linear_bytes_per_parameter(self, dtype_bytes: int) -> float:
        """Bytes one linear-layer weight costs on the GPU, scales and zero points included."""
        if not self.quantized:
            return dtype_bytes
        return self.weight_bits / 8 + self.scale_bytes_per_weight


NO_QUANTIZATION = Quantization()


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that memory and tensor parallelism depend on."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_model_len: int
    max_model_len_source: str
    torch_dtype: str
    rules: FamilyRules
    quantization: Quantization = NO_QUANTIZATION
    mla: MlaShape | None = None
    moe: MoeShape | None = None
    sliding_window: int | None = None
    sliding_layers: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    known_family: bool = True

    @property
    def dense_layers(self) -> int:
        """Layers whose feed-forward block is a plain MLP of intermediate_size."""
        return self.num_layers - (self.moe.moe_layers if self.moe else 0)

    @property
    def activation_ffn_width(self) -> int:
        """Feed-forward width one token touches: the dense MLP, or its routed + shared experts."""
        if self.moe is None:
            return self.intermediate_size
        routed = self.moe.experts_per_token * self.moe.expert_intermediate_size
        dense = self.intermediate_size if self.dense_layers else 0
        return max(dense, routed + self.moe.shared_intermediate_size)


def model_from_config(config: Mapping[str, Any]) -> ModelShape:
    """Read a Hugging Face ``config.json`` mapping into a ModelShape.

    Raises PlannerError naming the first missing field, so an empty ``{}`` config (the field
    report's lesson 1) is refused rather than planned from guesses."""
    config = _text_config(config)
    model_type = str(config.get("model_type") or "")
    rules = FAMILIES.get(model_type, FamilyRules())
    hidden = _required(config, "hidden_size", "n_embd", "d_model")
    heads = _required(config, "num_attention_heads", "n_head")
    max_len, max_len_source = derived_max_model_len(config)
    sliding_window, sliding_layers = _sliding_layers(config, model_type)
    return ModelShape(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=_required(config, "num_hidden_layers", "n_layer", "num_layers"),
        num_attention_heads=heads,
        num_kv_heads=_first_int(config, KV_HEAD_KEYS) or heads,
        head_dim=int(config.get("head_dim") or 0) or hidden // heads,
        intermediate_size=int(config.get("intermediate_size") or 0),
        vocab_size=_required(config, "vocab_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", rules.tie_default)),
        max_model_len=max_len,
        max_model_len_source=max_len_source,
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        rules=rules,
        quantization=quantization_from_config(config.get("quantization_config")),
        mla=_mla_shape(config),
        moe=_moe_shape(config, model_type),
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        known_family=model_type in FAMILIES,
    )


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal configs nest the language model under text_config; dtype and quantization
    stay at the top level."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        return config
    top = {key: config.get(key) for key in ("torch_dtype", "dtype", "quantization_config")}
    return {**text, **{key: value for key, value in top.items() if value is not None}}


def _first_int(config: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _required(config: Mapping[str, Any], *keys: str) -> int:
    value = _first_int(config, keys)
    if value is None:
        raise PlannerError(f"config.json has no positive integer {keys[0]!r}")
    return value


def derived_max_model_len(config: Mapping[str, Any]) -> tuple[int, str]:
    """The model's own maximum length as vLLM derives it: the smallest of the length keys,
    stretched by a rope scaling factor except for the types that already include it."""
    found = [(config[key], key) for key in MAX_LENGTH_KEYS if _first_int(config, (key,))]
    if not found:
        raise PlannerError("config.json has no max_position_embeddings (or another length key)")
    length, key = min(found)
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, Mapping) or str(config.get("model_type")).startswith("gemma3"):
        return length, key  # vLLM does not stretch Gemma 3's length by its rope factor
    rope_type = scaling.get("rope_type") or scaling.get("type")
    factor = scaling.get("factor")
    if rope_type in (None, "default", "su", "longrope", "llama3", "mrope") or not factor:
        return length, key
    if rope_type == "yarn":
        length = scaling.get("original_max_position_embeddings") or length
    return int(length * factor), f"{key} x rope_scaling.factor"


def _sliding_layers(config: Mapping[str, Any], model_type: str) -> tuple[int | None, int]:
    """(window, number of sliding-window layers). Families whose sliding layers vLLM's
    allocator is not known to shrink are counted as full attention, which over-estimates."""
    window = _first_int(config, ("sliding_window",))
    layers = int(config.get("num_hidden_layers") or 0)
    layer_types = config.get("layer_types")
    if window is None or layers == 0:
        return None, 0
    if isinstance(layer_types, list):
        return window, sum(1 for kind in layer_types if kind == "sliding_attention")
    if model_type == "gemma2":  # even layers slide (Gemma2DecoderLayer: not layer_idx % 2)
        return window, (layers + 1) // 2
    if model_type == "gemma3_text":
        pattern = int(config.get("sliding_window_pattern") or 6)
        return window, layers - layers // pattern
    if model_type == "mistral":
        return window, layers
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and config.get(
        "use_sliding_window"
    ):
        return window, max(0, layers - int(config.get("max_window_layers") or layers))
    return None, 0


def _mla_shape(config: Mapping[str, Any]) -> MlaShape | None:
    rank = _first_int(config, ("kv_lora_rank",))
    if rank is None:
        return None
    return MlaShape(
        kv_lora_rank=rank,
        q_lora_rank=_first_int(config, ("q_lora_rank",)),
        qk_nope_head_dim=_required(config, "qk_nope_head_dim"),
        qk_rope_head_dim=_required(config, "qk_rope_head_dim"),
        v_head_dim=_required(config, "v_head_dim"),
    )


def _moe_shape(config: Mapping[str, Any], model_type: str) -> MoeShape | None:
    experts = _first_int(config, EXPERT_COUNT_KEYS)
    if experts is None:
        return None
    expert_width = _first_int(config, ("moe_intermediate_size",)) or _required(
        config, "intermediate_size"
    )
    shared = _first_int(config, ("shared_expert_intermediate_size",)) or 0
    shared_experts = _first_int(config, ("n_shared_experts", "moe_num_shared_experts")) or 0
    return MoeShape(
        num_experts=experts,
        experts_per_token=_first_int(config, EXPERTS_PER_TOKEN_KEYS) or 1,
        expert_intermediate_size=expert_width,
        shared_intermediate_size=shared or shared_experts * expert_width,
        shared_expert_gate=model_type == "qwen2_moe" and shared > 0,
        router_bias=config.get("topk_method") == "noaux_tc",
        moe_layers=len(_moe_layer_indices(config, model_type)),
    )


def _moe_layer_indices(config: Mapping[str, Any], model_type: str) -> list[int]:
    """Which layers route to experts: Qwen-MoE by sparse step and mlp_only_layers, DeepSeek
    after first_k_dense_replace every moe_layer_freq layers, others every layer."""
    layers = range(_required(config, "num_hidden_layers", "n_layer", "num_layers"))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        return [i for i in layers if i not in dense and (i + 1) % step == 0]
    first = int(config.get("first_k_dense_replace") or 0)
    frequency = int(config.get("moe_layer_freq") or 1)
    return [i for i in layers if i >= first and i % frequency == 0]


def quantization_from_config(quantization_config: Any) -> Quantization:
    """Bytes per linear weight from ``quantization_config``: FP8 (1 B + block scales), AWQ/GPTQ
    and compressed-tensors integers (bits/8 + a 16-bit scale and a packed zero point per group),
    NVFP4/MXFP4 (0.5 B + one 8-bit scale per 16/32). Unknown methods raise PlannerError."""
    if not isinstance(quantization_config, Mapping):
        return NO_QUANTIZATION
    method = str(quantization_config.get("quant_method") or "").lower()
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    if method == "modelopt":
        algorithm = str(quantization_config.get("quant_algo") or "").upper()
        method = "nvfp4" if "FP4" in algorithm else "fp8"
    if method in ("fp8", "fbgemm_fp8"):
        return _fp8(quantization_config.get("weight_block_size"))
    if method in ("nvfp4", "mxfp4"):
        group = 16 if method == "nvfp4" else 32
        return Quantization(method, 4, group, 1 / group)
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "bitsandbytes"):
        bits = int(quantization_config.get("bits") or quantization_config.get("w_bit") or 4)
        group = quantization_config.get("group_size", quantization_config.get("q_group_size"))
        return _integer(method, bits, int(group) if group else None)
    raise PlannerError(f"quantization method {method or '(none)'!r} is not modelled")


def _fp8(block: Any) -> Quantization:
    """FP8 weights; DeepSeek-style 128x128 blocks add one float32 scale per block."""
    if isinstance(block, list | tuple) and len(block) == 2:
        rows, columns = (int(size) for size in block)
        return Quantization("fp8", 8, columns, 4 / (rows * columns))
    return Quantization("fp8", 8)


def _integer(method: str, bits: int, group: int | None) -> Quantization:
    """Packed integers with a float16 scale and a packed zero point per group (GPTQ stores
    qzeros even when symmetric); per-channel scales (group -1) are negligible."""
    if not group or group <= 0:
        return Quantization(method, bits)
    return Quantization(method, bits, group, (2 + bits / 8) / group)


def _compressed_tensors(quantization_config: Mapping[str, Any]) -> Quantization:
    groups = quantization_config.get("config_groups") or {}
    weights = next((g.get("weights") for g in groups.values() if isinstance(g, Mapping)), None)
    if not isinstance(weights, Mapping):
        raise PlannerError("compressed-tensors quantization_config has no weights scheme")
    bits = int(weights.get("num_bits") or 8)
    if weights.get("type") == "float":
        return _fp8(weights.get("block_structure")) if bits == 8 else Quantization("fp4", bits)
    return _integer("compressed-tensors", bits, weights.get("group_size"))


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


# =================================================================================================
# Tensor-parallel rules
# =================================================================================================


def tensor_parallel_problems(model: ModelShape, tp: int, gpu_count: int) -> tuple[str, ...]:
    """Why vLLM would refuse tensor-parallel size ``tp`` for this model on a host with
    ``gpu_count`` GPUs (vllm.md §3.7); empty when it is valid. Sizes that are not powers of two
    are valid exactly when every divisibility rule holds for them."""
    problems = [*_head_problems(model, tp), *_width_problems(model, tp)]
    if tp > gpu_count:
        problems.append(f"TP {tp} needs {tp} GPUs on one host; {gpu_count} available")
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
class _Context:
    """What every evaluation of one request shares."""

    model: ModelShape
    weights: ModelWeights
    request: PlanRequest
    max_model_len: int
    kv_element_bytes: int


def _context(model: ModelShape, weights: ModelWeights, request: PlanRequest) -> _Context:
    if request.gpu_count < 1 or request.gpu_memory_bytes <= 0:
        raise PlannerError("need at least one GPU with a positive memory size")
    if not 0 < request.gpu_memory_utilization <= 1:
        raise PlannerError("gpu_memory_utilization must be in (0, 1]")
    if (request.max_model_len or 1) < 1 or (request.tensor_parallel_size or 1) < 1:
        raise PlannerError("max_model_len and the tensor-parallel size must be positive")
    return _Context(
        model=model,
        weights=weights,
        request=request,
        max_model_len=request.max_model_len or model.max_model_len,
        kv_element_bytes=kv_cache_dtype_bytes(request.kv_cache_dtype, weights.dtype_bytes),
    )


def evaluate(context: _Context, tp: int) -> TensorParallelOption:
    """Check ``tp`` against vLLM's rules and one GPU's memory."""
    model, request = context.model, context.request
    memory = gpu_memory(model, context.weights, request, tp)
    batched, _ = batching_budget(request)
    problems = tensor_parallel_problems(model, tp, request.gpu_count)
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


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def _option_reasons(context: _Context, option: TensorParallelOption) -> tuple[str, ...]:
    """Why one TP fits or not, in numbers."""
    tp, memory = option.tensor_parallel_size, option.memory
    if option.problems:
        return (f"TP {tp} is not valid: {'; '.join(option.problems)}",)
    budget = (
        f"the {_gib(memory.budget_bytes)} budget ({_gib(memory.total_bytes)} x "
        f"{context.request.gpu_memory_utilization:g})"
    )
    if memory.weights_bytes > memory.budget_bytes:
        return (f"TP {tp} refused: weights take {_gib(memory.weights_bytes)} per GPU, more than "
                f"{budget}; vLLM would run out of memory loading them",)  # fmt: skip
    if memory.shortfall_bytes:
        return (f"TP {tp} refused: weights {_gib(memory.weights_bytes)} + overhead "
                f"{_gib(memory.overhead_bytes)} per GPU exceed {budget}, leaving no memory for "
                "the KV cache ('No available memory for the cache blocks')",)  # fmt: skip
    return _kv_reasons(context, option, budget)


def _kv_reasons(context: _Context, option: TensorParallelOption, budget: str) -> tuple[str, ...]:
    tp, memory, length = option.tensor_parallel_size, option.memory, context.max_model_len
    kv_left = (
        f"weights {_gib(memory.weights_bytes)} + overhead {_gib(memory.overhead_bytes)} leave "
        f"{_gib(memory.kv_cache_bytes)} of {budget} for the KV cache per GPU"
    )
    reasons = []
    if length > context.model.max_model_len:
        reasons.append(f"TP {tp} refused: max_model_len {length} exceeds the model's maximum "
                       f"{context.model.max_model_len} ({context.model.max_model_len_source}); "
                       "vLLM refuses it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")  # fmt: skip
    elif memory.kv_cache_bytes < option.kv_bytes_per_sequence:
        reasons.append(f"TP {tp} refused: {kv_left}; one sequence of max_model_len {length} "
                       f"needs {_gib(option.kv_bytes_per_sequence)}; the largest context "
                       f"that fits is {option.max_model_len_supported}")  # fmt: skip
    else:
        sequences = memory.kv_cache_bytes / max(1, option.kv_bytes_per_sequence)
        reasons.append(f"TP {tp} fits: {kv_left}, enough for {sequences:.1f} sequences of "
                       f"{length} tokens")  # fmt: skip
    if _short_of_free_memory(context.request, memory):
        reasons.append(f"TP {tp} refused: only {_gib(context.request.gpu_free_bytes or 0)} free "
                       f"but the budget asks {_gib(memory.budget_bytes)}; vLLM refuses to start "
                       "('Free memory on device ... is less than desired GPU memory "
                       "utilization')")  # fmt: skip
    return tuple(reasons)


def candidate_sizes(request: PlanRequest) -> tuple[int, ...]:
    """The tensor-parallel sizes to evaluate: 1..GPUs, or the one the request names."""
    if request.tensor_parallel_size is not None:
        return (request.tensor_parallel_size,)
    return tuple(range(1, request.gpu_count + 1))


def _choose(
    context: _Context,
) -> tuple[tuple[TensorParallelOption, ...], TensorParallelOption | None]:
    """Every candidate's outcome, and the smallest valid TP that fits (None if none does)."""
    options = tuple(evaluate(context, tp) for tp in candidate_sizes(context.request))
    return options, next((option for option in options if option.fits), None)


# =================================================================================================
# Suggestions
# =================================================================================================


@dataclass(frozen=True)
class Suggestion:
    """A concrete change that makes the plan fit (or fit better), with the numbers."""

    kind: str
    message: str
    changes: Mapping[str, Any] = field(default_factory=dict)


def _fitting_option(
    model: ModelShape, weights: ModelWeights, request: PlanRequest
) -> TensorParallelOption | None:
    return _choose(_context(model, weights, request))[1]


def _outcome(
    context: _Context, **changes: Any
) -> tuple[TensorParallelOption | None, TensorParallelOption | None]:
    """(the option that fits, the closest one) for the request with ``changes`` applied."""
    request = dataclasses.replace(context.request, **changes)
    options, chosen = _choose(_context(context.model, context.weights, request))
    return chosen, _closest(options)


def suggestions(
    context: _Context, reference: TensorParallelOption | None
) -> tuple[Suggestion, ...]:
    """Concrete alternatives when the request does not fit: the largest context that fits,
    an fp8 KV cache, a higher utilization, more GPUs, larger GPUs, a quantized checkpoint."""
    found = [
        _another_tensor_parallel_size(context),
        _shorter_context(context, reference),
        _fp8_kv_cache(context, reference),
        _higher_utilization(context, reference),
        _more_gpus(context),
        _larger_gpus(context),
        *_quantized_checkpoints(context),
    ]
    return tuple(suggestion for suggestion in found if suggestion is not None)


def _another_tensor_parallel_size(context: _Context) -> Suggestion | None:
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
        f"with {_gib(chosen.memory.kv_cache_bytes)} of KV cache per GPU",
        {"tensor_parallel_size": tp},
    )


def _shorter_context(
    context: _Context, reference: TensorParallelOption | None
) -> Suggestion | None:
    if reference is None or reference.max_model_len_supported <= 0:
        return None
    length, tp = reference.max_model_len_supported, reference.tensor_parallel_size
    return Suggestion(
        "max_model_len",
        f"Set --max-model-len {length}: the largest context that fits at TP {tp} "
        f"(max_model_len {context.max_model_len} needs "
        f"{_gib(reference.kv_bytes_per_sequence)} of KV cache per GPU, "
        f"{_gib(reference.memory.kv_cache_bytes)} is left)",
        {"max_model_len": length, "tensor_parallel_size": tp},
    )


def _fp8_kv_cache(context: _Context, reference: TensorParallelOption | None) -> Suggestion | None:
    if context.kv_element_bytes <= 1:
        return None
    chosen, closest = _outcome(context, kv_cache_dtype="fp8")
    return _variant_suggestion(
        context, reference, chosen, closest, "kv_cache_dtype", "fp8",
        "Use --kv-cache-dtype fp8 (it halves the KV cache)",
    )  # fmt: skip


def _higher_utilization(
    context: _Context, reference: TensorParallelOption | None
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
    context: _Context,
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


def _more_gpus(context: _Context) -> Suggestion | None:
    request = context.request
    for tp in range(request.gpu_count + 1, MAX_SUGGESTED_TENSOR_PARALLEL_SIZE + 1):
        bigger = dataclasses.replace(request, gpu_count=tp, tensor_parallel_size=tp)
        option = _fitting_option(context.model, context.weights, bigger)
        if option is not None:
            return Suggestion(
                "gpu_count",
                f"Use {tp} GPUs of {_gib(request.gpu_memory_bytes)} at TP {tp}: max_model_len "
                f"{context.max_model_len} fits with {_gib(option.memory.kv_cache_bytes)} of KV "
                "cache per GPU",
                {"gpu_count": tp, "tensor_parallel_size": tp},
            )
    return None


def _larger_gpus(context: _Context) -> Suggestion | None:
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
    ("an AWQ/GPTQ int4 (group 128)", _integer("awq", 4, 128)),
)


def _quantized_checkpoints(context: _Context) -> list[Suggestion]:
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
                f"Use {label} checkpoint of the model (~{_gib(weights.loaded_bytes)} of "
                f"weights): max_model_len {context.max_model_len} fits at TP {tp}",
                {"quantization": quantization.method, "tensor_parallel_size": tp},
            ))  # fmt: skip
    return found


# =================================================================================================
# Start-up
# =================================================================================================


@dataclass(frozen=True)
class StartupEstimate:
    """How long the engine takes to become ready, and the timers derived from it."""

    read_s: int
    engine_init_s: int
    compile_s: int
    cuda_graph_s: int
    health_start_period_s: int
    stall_timeout_s: int
    engine_ready_timeout_s: int

    @property
    def total_s(self) -> int:
        """Seconds from container start to the first healthy answer, estimated."""
        return self.read_s + self.engine_init_s + self.compile_s + self.cuda_graph_s

    def environment(self) -> dict[str, str]:
        """Environment variables the launcher sets from this estimate."""
        return {"VLLM_ENGINE_READY_TIMEOUT_S": str(self.engine_ready_timeout_s)}


def _round_up(seconds: float, step: int) -> int:
    return int(-(-math.ceil(seconds) // step) * step)


def startup_estimate(checkpoint_bytes: int, request: PlanRequest) -> StartupEstimate:
    """Reading the checkpoint at the assumed throughput, plus engine init, torch.compile and
    CUDA-graph capture (both skipped with --enforce-eager). The health start period adds a
    margin; the stall timeout covers the longest silent phase (one shard, or compilation)."""
    if request.read_bytes_per_second <= 0:
        raise PlannerError("read throughput must be positive")
    read_s = math.ceil(checkpoint_bytes / request.read_bytes_per_second)
    compile_s = 0 if request.enforce_eager else TORCH_COMPILE_S
    graph_s = 0 if request.enforce_eager else CUDA_GRAPH_CAPTURE_S
    total = read_s + ENGINE_INIT_S + compile_s + graph_s
    shard_s = min(checkpoint_bytes, DEFAULT_SHARD_BYTES) / request.read_bytes_per_second
    silent = max(shard_s, compile_s, graph_s, ENGINE_INIT_S)
    return StartupEstimate(
        read_s=read_s,
        engine_init_s=ENGINE_INIT_S,
        compile_s=compile_s,
        cuda_graph_s=graph_s,
        health_start_period_s=max(
            MIN_HEALTH_START_PERIOD_S, _round_up(total * HEALTH_START_PERIOD_MARGIN, 30)
        ),
        stall_timeout_s=max(MIN_STALL_TIMEOUT_S, _round_up(silent * STALL_TIMEOUT_MARGIN, 30)),
        engine_ready_timeout_s=max(
            VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S, _round_up(total * ENGINE_READY_TIMEOUT_MARGIN, 60)
        ),
    )


# =================================================================================================
# The plan
# =================================================================================================


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
    context = _context(model, weights, request)
    options, chosen = _choose(context)
    reference = chosen or _closest(options)
    return Plan(
        model=model,
        parameter_count=weights.parameter_count,
        parameters_exact=weights.exact and not (summary and summary.has_packed_integers),
        weights_bytes=weights.loaded_bytes,
        checkpoint_bytes=weights.checkpoint_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model, context.kv_element_bytes),
        valid_tensor_parallel_sizes=valid_sizes(model, request.gpu_count),
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


def valid_sizes(model: ModelShape, gpu_count: int) -> tuple[int, ...]:
    """Every tensor-parallel size from 1 to ``gpu_count`` that vLLM accepts for the model."""
    return tuple(
        tp for tp in range(1, gpu_count + 1) if not tensor_parallel_problems(model, tp, gpu_count)
    )


def _closest(options: tuple[TensorParallelOption, ...]) -> TensorParallelOption | None:
    """The option to show when nothing fits: the requested one, else the largest valid TP."""
    if len(options) == 1:
        return options[0]
    valid = [option for option in options if option.valid]
    return valid[-1] if valid else None


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
