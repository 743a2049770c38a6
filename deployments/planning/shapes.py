"""The model as read from ``config.json``: layer sizes, attention and MoE layout,
quantization. Pure; raises PlannerError naming the first field it cannot read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from deployments.planning.request import PlannerError
from models_registry.strict_json import StrictJsonError, check_numbers

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
    report's lesson 1) is refused rather than planned from guesses, and one holding a number
    no config has (NaN, 1e308, a 5,000-digit integer) is refused by its key."""
    try:
        check_numbers(config)
    except StrictJsonError as exc:
        raise PlannerError(f"config.json {exc}") from None
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
        return integer_quantization(method, bits, int(group) if group else None)
    raise PlannerError(f"quantization method {method or '(none)'!r} is not modelled")


def _fp8(block: Any) -> Quantization:
    """FP8 weights; DeepSeek-style 128x128 blocks add one float32 scale per block."""
    if isinstance(block, list | tuple) and len(block) == 2:
        rows, columns = (int(size) for size in block)
        return Quantization("fp8", 8, columns, 4 / (rows * columns))
    return Quantization("fp8", 8)


def integer_quantization(method: str, bits: int, group: int | None) -> Quantization:
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
    return integer_quantization("compressed-tensors", bits, weights.get("group_size"))
