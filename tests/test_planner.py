"""The deployment planner (issue 5): parameters, KV cache, per-GPU budget, TP rules, suggestions,
start-up timers. Pure functions; no database.

The configs under ``tests/fixtures/model_configs/`` are the published ``config.json`` files of
these checkpoints on the Hugging Face Hub (``https://huggingface.co/<repo>/blob/main/config.json``):

- ``llama-3.1-70b-instruct.json``    meta-llama/Llama-3.1-70B-Instruct
- ``llama-3.1-8b-instruct.json``     meta-llama/Llama-3.1-8B-Instruct
- ``qwen2.5-7b-instruct.json``       Qwen/Qwen2.5-7B-Instruct
- ``qwen3-8b.json``                  Qwen/Qwen3-8B
- ``qwen3-32b.json``                 Qwen/Qwen3-32B
- ``gemma-2-9b-it.json``             google/gemma-2-9b-it
- ``mistral-7b-v0.1.json``           mistralai/Mistral-7B-v0.1
- ``phi-3-mini-4k-instruct.json``    microsoft/Phi-3-mini-4k-instruct
- ``mixtral-8x7b-instruct-v0.1.json`` mistralai/Mixtral-8x7B-Instruct-v0.1
- ``qwen1.5-moe-a2.7b-chat.json``    Qwen/Qwen1.5-MoE-A2.7B-Chat
- ``deepseek-v2-lite-chat.json``     deepseek-ai/DeepSeek-V2-Lite-Chat
- ``deepseek-v3.json``               deepseek-ai/DeepSeek-V3

The exact parameter counts in ``PUBLISHED_PARAMETERS`` are the checkpoints' safetensors totals:
``metadata.total_size / 2`` of ``https://huggingface.co/<repo>/blob/main/model.safetensors.index.json``
for the BF16 checkpoints (Llama-3.1-70B: 141,107,412,992 B; Llama-3.1-8B: 16,060,522,496 B;
Qwen2.5-7B-Instruct: 15,231,233,024 B; Qwen3-8B: 16,381,470,720 B; Qwen3-32B: 65,524,246,528 B;
Mistral-7B: 14,483,464,192 B; Mixtral-8x7B: 93,405,585,408 B), or the Hub's safetensors
parameter count shown on the model page (gemma-2-9b-it 9,241,705,984; Phi-3-mini-4k-instruct
3,821,079,552; Qwen1.5-MoE-A2.7B 14,315,784,192; DeepSeek-V2-Lite 15,706,484,224). DeepSeek-V3's
671,026,419,200 is the "671B total parameters" of its model card and paper; its checkpoint (with
the multi-token-prediction layer vLLM does not load by default) is checked dtype by dtype against
the Hub's safetensors counts in ``test_deepseek_v3_counts_match_the_checkpoints_per_dtype_totals``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deployments.planning import (
    GIB,
    PlannerError,
    PlanRequest,
    WeightsSummary,
    model_from_config,
    parameter_count_from_config,
    plan,
)
from deployments.planning.memory import (
    KV_BLOCK_SIZE,
    kv_bytes_for_sequence,
    kv_bytes_per_token,
    kv_bytes_per_token_per_layer,
    model_weights,
    weight_groups,
)
from deployments.planning.options import tensor_parallel_problems, valid_sizes
from deployments.planning.shapes import quantization_from_config
from deployments.planning.startup import (
    MIN_HEALTH_START_PERIOD_S,
    VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S,
    startup_estimate,
)

CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"
BASE_DIR = Path(__file__).resolve().parent.parent

PUBLISHED_PARAMETERS = {
    "llama-3.1-70b-instruct.json": 70_553_706_496,
    "llama-3.1-8b-instruct.json": 8_030_261_248,
    "qwen2.5-7b-instruct.json": 7_615_616_512,
    "qwen3-8b.json": 8_190_735_360,
    "qwen3-32b.json": 32_762_123_264,
    "gemma-2-9b-it.json": 9_241_705_984,
    "mistral-7b-v0.1.json": 7_241_732_096,
    "phi-3-mini-4k-instruct.json": 3_821_079_552,
    "mixtral-8x7b-instruct-v0.1.json": 46_702_792_704,
    "qwen1.5-moe-a2.7b-chat.json": 14_315_784_192,
    "deepseek-v2-lite-chat.json": 15_706_484_224,
    "deepseek-v3.json": 671_026_419_200,
}


def load(name: str) -> dict[str, Any]:
    """One of the published configs under tests/fixtures/model_configs/."""
    return json.loads((CONFIGS / name).read_text())


def a100_40gb(**overrides: Any) -> PlanRequest:
    """The field report's host: four 40 GB cards, vLLM's default utilization."""
    return PlanRequest(**{"gpu_memory_bytes": 40 * GIB, "gpus_on_host": 4, **overrides})


# --- parameters and weight bytes ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "published"), sorted(PUBLISHED_PARAMETERS.items()))
def test_parameter_count_from_config_matches_the_published_checkpoint(
    name: str, published: int
) -> None:
    model = model_from_config(load(name))

    assert parameter_count_from_config(model) == published


# The Hub's safetensors count for deepseek-ai/DeepSeek-V3 (https://huggingface.co/api/models/
# deepseek-ai/DeepSeek-V3, "safetensors.parameters"), per dtype. The checkpoint also holds the
# multi-token-prediction layer 61 (num_nextn_predict_layers: 1), which vLLM loads only for
# speculative decoding: one more MoE decoder layer, its own embed_tokens and shared_head, enorm,
# hnorm and eh_proj (2 x hidden -> hidden).
DEEPSEEK_V3_HUB_PARAMETERS = {"BF16": 3_918_786_560, "F8_E4M3": 680_571_043_840, "F32": 41_555_600}


def _fp8_block_scales(out_features: int, in_features: int) -> int:
    return -(-out_features // 128) * -(-in_features // 128)


def test_deepseek_v3_counts_match_the_checkpoints_per_dtype_totals() -> None:
    model = model_from_config(load("deepseek-v3.json"))
    assert model.moe is not None
    mtp = dataclasses.replace(model, num_layers=1, moe=dataclasses.replace(model.moe, moe_layers=1))
    hidden = model.hidden_size
    fp8 = [g for m in (model, mtp) for g in weight_groups(m) if g.quantizable]
    bf16 = [g for m in (model, mtp) for g in weight_groups(m)
            if not g.quantizable and g.name != "moe.router_bias"]  # fmt: skip
    mtp_extra = 2 * hidden + hidden * 2 * hidden  # enorm, hnorm, eh_proj
    attention = (
        _fp8_block_scales(1536, hidden) + _fp8_block_scales(128 * 192, 1536)
        + _fp8_block_scales(576, hidden) + _fp8_block_scales(128 * 256, 512)
        + _fp8_block_scales(hidden, 128 * 128)
    )  # fmt: skip
    dense_mlp = 3 * _fp8_block_scales(18432, hidden)
    moe_mlp = 257 * 3 * _fp8_block_scales(2048, hidden)  # 256 routed + 1 shared expert
    scales = 62 * attention + 3 * dense_mlp + 59 * moe_mlp
    router_biases = 59 * 256

    assert sum(g.parameters for g in fp8) == DEEPSEEK_V3_HUB_PARAMETERS["F8_E4M3"]
    assert sum(g.parameters for g in bf16) + mtp_extra == DEEPSEEK_V3_HUB_PARAMETERS["BF16"]
    assert scales + router_biases == DEEPSEEK_V3_HUB_PARAMETERS["F32"]


def test_bf16_weight_bytes_equal_the_safetensors_index_total_size() -> None:
    weights = model_weights(model_from_config(load("llama-3.1-70b-instruct.json")))

    assert weights.loaded_bytes == 141_107_412_992
    assert weights.checkpoint_bytes == 141_107_412_992
    assert not weights.exact


def test_exact_summary_overrides_the_config_estimate() -> None:
    config = load("llama-3.1-8b-instruct.json")
    summary = WeightsSummary(8_030_261_249, 16_060_522_498, {"BF16": 16_060_522_498})

    result = plan(config, PlanRequest(gpu_memory_bytes=24 * GIB, gpus_on_host=1), summary)

    assert result.parameter_count == 8_030_261_249
    assert result.parameters_exact
    assert result.weights_bytes == 16_060_522_498
    assert not any("computed from config.json" in reason for reason in result.reasons)


def test_float32_checkpoint_loads_as_16_bit_but_reads_4_bytes_per_parameter() -> None:
    config = {**load("qwen2.5-7b-instruct.json"), "torch_dtype": "float32"}
    weights = model_weights(model_from_config(config))

    assert weights.loaded_bytes == 2 * 7_615_616_512
    assert weights.checkpoint_bytes == 4 * 7_615_616_512
    assert model_weights(model_from_config(config), "float32").loaded_bytes == 4 * 7_615_616_512


def test_packed_int4_summary_keeps_the_config_parameter_count_and_exact_bytes() -> None:
    config = {
        **load("qwen2.5-7b-instruct.json"),
        "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq",
                                "version": "gemm", "zero_point": True},
    }  # fmt: skip
    summary = WeightsSummary(
        1_000_000_000, 5_580_000_000, {"I32": 3_500_000_000, "F16": 2_080_000_000}
    )

    result = plan(config, PlanRequest(gpu_memory_bytes=24 * GIB, gpus_on_host=1), summary)

    assert result.parameter_count == 7_615_616_512
    assert not result.parameters_exact
    assert result.weights_bytes == 5_580_000_000


def test_awq_int4_costs_about_half_a_byte_per_linear_weight_with_16_bit_embeddings() -> None:
    awq = quantization_from_config({"bits": 4, "group_size": 128, "quant_method": "awq"})
    config = {**load("qwen2.5-7b-instruct.json"), "quantization_config": {
        "bits": 4, "group_size": 128, "quant_method": "awq"}}  # fmt: skip
    model = model_from_config(config)
    embeddings = 2 * 152_064 * 3584  # embed_tokens + lm_head, untied, 16-bit

    weights = model_weights(model)

    assert awq.linear_bytes_per_parameter(2) == pytest.approx(0.5 + 2.5 / 128)
    linear = 7_615_616_512 - embeddings - 28 * 2 * 3584 - 3584  # minus norms
    expected = embeddings * 2 + (28 * 2 * 3584 + 3584) * 2 + linear * (0.5 + 2.5 / 128)
    assert weights.loaded_bytes == pytest.approx(expected, rel=1e-4)


def test_fp8_block_quantized_deepseek_v3_costs_one_byte_plus_block_scales() -> None:
    model = model_from_config(load("deepseek-v3.json"))

    assert model.quantization.method == "fp8"
    assert model.quantization.linear_bytes_per_parameter(2) == pytest.approx(1 + 4 / 128**2)
    assert 1.0 < model_weights(model).loaded_bytes / parameter_count_from_config(model) < 1.01


def test_unknown_quantization_method_is_refused_rather_than_guessed() -> None:
    with pytest.raises(PlannerError, match="not modelled"):
        quantization_from_config({"quant_method": "mystery"})


def test_empty_config_is_refused_naming_the_missing_field() -> None:
    with pytest.raises(PlannerError, match="hidden_size"):
        model_from_config({})


# --- KV cache -------------------------------------------------------------------------------------


def test_kv_cache_per_token_uses_gqa_kv_heads_not_attention_heads() -> None:
    model = model_from_config(load("llama-3.1-70b-instruct.json"))

    assert kv_bytes_per_token(model, 2) == 2 * 80 * 8 * 128 * 2  # 320 KiB, not 64 heads' 2.5 MiB
    assert kv_bytes_per_token_per_layer(model, 4, 2) == 2 * 2 * 128 * 2


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    model = model_from_config(load("llama-3.1-70b-instruct.json"))

    per_gpu = {tp: kv_bytes_per_token_per_layer(model, tp, 2) for tp in (1, 2, 4, 8, 16)}

    assert per_gpu == {1: 4096, 2: 2048, 4: 1024, 8: 512, 16: 512}


def test_mla_caches_one_latent_per_token_not_split_by_tp() -> None:
    v3 = model_from_config(load("deepseek-v3.json"))
    lite = model_from_config(load("deepseek-v2-lite-chat.json"))

    # One latent of 512 + 64 per layer, on every rank:
    assert kv_bytes_per_token(v3, 2) == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(lite, 2) == 27 * 576 * 2
    assert {kv_bytes_per_token_per_layer(v3, tp, 2) for tp in (1, 2, 4, 8)} == {576 * 2}


def test_explicit_head_dim_is_honoured_over_hidden_size_over_heads() -> None:
    gemma = model_from_config(load("gemma-2-9b-it.json"))
    qwen3 = model_from_config(load("qwen3-32b.json"))

    assert (gemma.head_dim, 3584 // 16) == (256, 224)
    assert kv_bytes_per_token(gemma, 2) == 2 * 42 * 8 * 256 * 2
    assert (qwen3.head_dim, 5120 // 64) == (128, 80)
    assert kv_bytes_per_token(qwen3, 2) == 2 * 64 * 8 * 128 * 2


def test_fp8_kv_cache_halves_the_kv_bytes_per_token() -> None:
    config = load("llama-3.1-70b-instruct.json")

    auto = plan(config, a100_40gb(max_model_len=8192))
    fp8 = plan(config, a100_40gb(max_model_len=8192, kv_cache_dtype="fp8"))

    assert fp8.kv_bytes_per_token * 2 == auto.kv_bytes_per_token
    assert fp8.max_model_len_supported >= 2 * auto.max_model_len_supported - KV_BLOCK_SIZE


def test_unknown_kv_cache_dtype_is_refused() -> None:
    with pytest.raises(PlannerError, match="kv-cache-dtype"):
        plan(load("llama-3.1-8b-instruct.json"), a100_40gb(kv_cache_dtype="int3"))


def test_sliding_window_layers_cap_their_kv_cache_at_the_window() -> None:
    mistral = model_from_config(load("mistral-7b-v0.1.json"))
    gemma = model_from_config(load("gemma-2-9b-it.json"))
    qwen = model_from_config(load("qwen2.5-7b-instruct.json"))  # use_sliding_window: false

    full_32k = 32 * 32768 * kv_bytes_per_token_per_layer(mistral, 1, 2)
    sliding_32k = kv_bytes_for_sequence(mistral, 1, 2, 32768, batched_tokens=2048)

    assert (mistral.sliding_layers, gemma.sliding_layers, qwen.sliding_layers) == (32, 21, 0)
    assert sliding_32k == 32 * ((4095 + 2048) // 16 + 1 + 1) * 16 * 2 * 8 * 128 * 2
    assert sliding_32k < full_32k / 5


def test_multimodal_config_is_planned_from_its_text_config() -> None:
    # Shaped like google/gemma-3-12b-it's config.json: the language model under text_config,
    # five sliding-window layers for each global one, a linear rope factor vLLM does not apply.
    text = {
        "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "num_hidden_layers": 48, "vocab_size": 262208, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
        "sliding_window_pattern": 6, "torch_dtype": "float32",
    }  # fmt: skip
    config = {"model_type": "gemma3", "text_config": text, "torch_dtype": "bfloat16"}

    model = model_from_config(config)

    assert (model.model_type, model.torch_dtype) == ("gemma3_text", "bfloat16")
    assert (model.sliding_layers, model.max_model_len) == (40, 131072)
    assert model.tie_word_embeddings


def test_largest_context_is_whole_blocks_and_capped_at_the_model_maximum() -> None:
    fits = plan(load("llama-3.1-8b-instruct.json"), PlanRequest(80 * GIB, 1))
    tight = plan(load("llama-3.1-70b-instruct.json"), a100_40gb(max_model_len=8192))

    assert fits.max_model_len_supported == 131072
    assert tight.max_model_len_supported % KV_BLOCK_SIZE == 0


# --- the field report's case (lesson 3) -----------------------------------------------------------


@pytest.mark.parametrize("gpu_gib", [40, 39.5])  # nominal, and what vLLM reports for an A100-40GB
def test_70b_bf16_on_40gb_cards_refuses_tp_1_and_2_and_fits_tp_4_at_8k(gpu_gib: float) -> None:
    result = plan(
        load("llama-3.1-70b-instruct.json"),
        a100_40gb(gpu_memory_bytes=round(gpu_gib * GIB), max_model_len=8192),
    )
    outcome = {option.tensor_parallel_size: option for option in result.options}

    assert result.fits
    assert result.tensor_parallel_size == 4
    assert result.valid_tensor_parallel_sizes == (1, 2, 4)
    assert not outcome[1].fits
    assert outcome[1].memory.weights_bytes > 130 * GIB
    assert not outcome[2].fits
    assert outcome[2].memory.weights_bytes > outcome[2].memory.budget_bytes
    assert not outcome[3].valid
    assert any(r.startswith("TP 1 refused: weights take 131.4 GiB") for r in result.reasons)
    assert any(r.startswith("TP 2 refused: weights take 65.7 GiB") for r in result.reasons)
    assert result.suggestions == ()


def test_70b_default_128k_context_is_refused_at_tp_4_with_the_largest_context_stated() -> None:
    result = plan(load("llama-3.1-70b-instruct.json"), a100_40gb())
    supported = result.max_model_len_supported

    assert result.max_model_len == 131072  # the model's own maximum, as vLLM derives it
    assert not result.fits
    assert result.tensor_parallel_size is None
    assert result.per_gpu_tensor_parallel_size == 4
    assert 8192 < supported < 131072
    assert any(
        r.startswith("TP 4 refused") and f"the largest context that fits is {supported}" in r
        for r in result.reasons
    )
    assert result.suggestions[0].changes == {"max_model_len": supported, "tensor_parallel_size": 4}


def test_refused_plan_suggests_concrete_alternatives_with_numbers() -> None:
    result = plan(load("llama-3.1-70b-instruct.json"), a100_40gb())
    kinds = {suggestion.kind: suggestion for suggestion in result.suggestions}

    assert set(kinds) >= {"max_model_len", "kv_cache_dtype", "gpu_memory_utilization",
                          "gpu_count", "gpu_memory", "quantization"}  # fmt: skip
    assert kinds["gpu_count"].changes == {"gpu_count": 8, "tensor_parallel_size": 8}
    assert kinds["gpu_memory"].changes == {"gpu_memory_gib": 80, "tensor_parallel_size": 4}
    assert kinds["kv_cache_dtype"].changes["max_model_len"] > result.max_model_len_supported
    assert "FP8 checkpoint" in " ".join(s.message for s in result.suggestions)


def test_a_shorter_context_or_fp8_kv_cache_fits_where_the_suggestion_says() -> None:
    config = load("llama-3.1-70b-instruct.json")
    refused = plan(config, a100_40gb())

    shorter = plan(config, a100_40gb(max_model_len=refused.max_model_len_supported))
    just_over = plan(config, a100_40gb(max_model_len=refused.max_model_len_supported + 16))

    assert shorter.fits
    assert shorter.tensor_parallel_size == 4
    assert not just_over.fits


def test_per_gpu_segments_add_up_to_the_card() -> None:
    result = plan(load("llama-3.1-70b-instruct.json"), a100_40gb(max_model_len=8192))
    memory = result.per_gpu
    assert memory is not None

    labels = [label for label, _ in memory.segments()]

    assert labels == ["weights", "kv_cache", "overhead", "headroom"]
    assert sum(size for _, size in memory.segments()) == memory.total_bytes
    assert memory.budget_bytes == math.ceil(40 * GIB * 0.92)  # vLLM rounds the request up


def test_explicit_tp_is_evaluated_instead_of_chosen() -> None:
    config = load("llama-3.1-70b-instruct.json")

    tp2 = plan(config, a100_40gb(max_model_len=8192, tensor_parallel_size=2))
    tp4 = plan(config, a100_40gb(max_model_len=8192, tensor_parallel_size=4))

    assert not tp2.fits
    assert (tp2.tensor_parallel_size, tp2.per_gpu_tensor_parallel_size) == (None, 2)
    assert tp2.suggestions[0].changes == {"tensor_parallel_size": 4}
    assert (tp4.fits, tp4.tensor_parallel_size) == (True, 4)


def test_budget_must_also_be_free_at_start() -> None:
    result = plan(
        load("llama-3.1-70b-instruct.json"),
        a100_40gb(max_model_len=8192, gpu_free_bytes=30 * GIB),
    )

    assert not result.fits
    assert any("Free memory on device" in reason for reason in result.reasons)


def test_context_above_the_model_maximum_is_refused() -> None:
    result = plan(load("qwen3-8b.json"), PlanRequest(80 * GIB, 1, max_model_len=65536))

    assert not result.fits
    assert any("VLLM_ALLOW_LONG_MAX_MODEL_LEN" in reason for reason in result.reasons)


def test_yarn_rope_scaling_stretches_the_original_length() -> None:
    model = model_from_config(load("deepseek-v2-lite-chat.json"))

    assert model.max_model_len == 4096 * 40


# --- tensor-parallel rules ----------------------------------------------------------------------


def test_qwen25_7b_heads_rule_out_tp_8() -> None:
    model = model_from_config(load("qwen2.5-7b-instruct.json"))

    problems = tensor_parallel_problems(model, 8, gpus_on_host=8)

    assert valid_sizes(model, 8) == (1, 2, 4)
    assert "28 attention heads are not divisible by TP 8" in problems
    assert tensor_parallel_problems(model, 7, 8)  # 28 % 7 == 0, but 4 KV heads and 18944 refuse


def test_tp_8_on_qwen25_7b_is_refused_when_asked_for() -> None:
    result = plan(
        load("qwen2.5-7b-instruct.json"),
        PlanRequest(24 * GIB, 8, tensor_parallel_size=8),
    )

    assert not result.fits
    assert result.max_model_len_supported == 0
    assert "28 attention heads are not divisible by TP 8" in result.reasons[-1]


def test_tp_cannot_exceed_the_gpus_on_one_host() -> None:
    model = model_from_config(load("llama-3.1-70b-instruct.json"))

    assert "TP 8 needs 8 GPUs on one host; 4 available" in tensor_parallel_problems(model, 8, 4)


def test_quantization_group_alignment_limits_tp() -> None:
    # Qwen2.5-72B's unpadded intermediate size with group-128 AWQ (vllm#5675, QwenLM/Qwen3#698)
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128}
    shape = {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
        "quantization_config": awq,
    }
    model = model_from_config({**load("qwen2.5-7b-instruct.json"), **shape})
    padded = model_from_config({**load("qwen2.5-7b-instruct.json"), **shape,
                                "intermediate_size": 29696})  # fmt: skip

    assert valid_sizes(model, 8) == (1,)
    assert (
        "not a multiple of the quantization group size 128"
        in tensor_parallel_problems(model, 4, 8)[0]
    )
    assert valid_sizes(padded, 8) == (1, 2, 4, 8)


def test_mla_models_need_only_the_attention_heads_to_divide() -> None:
    model = model_from_config(load("deepseek-v2-lite-chat.json"))

    assert valid_sizes(model, 16) == (1, 2, 4, 8, 16)


# --- MoE -----------------------------------------------------------------------------------------


def test_mixtral_holds_all_experts_and_needs_two_80gb_cards() -> None:
    config = load("mixtral-8x7b-instruct-v0.1.json")

    one = plan(config, PlanRequest(80 * GIB, 1))
    two = plan(config, PlanRequest(80 * GIB, 2))

    assert one.weights_bytes == 93_405_585_408
    assert not one.fits
    assert (two.fits, two.tensor_parallel_size, two.max_model_len) == (True, 2, 32768)


def test_deepseek_dense_first_layers_and_shared_experts() -> None:
    lite = model_from_config(load("deepseek-v2-lite-chat.json"))
    v3 = model_from_config(load("deepseek-v3.json"))

    assert lite.moe is not None
    assert v3.moe is not None
    assert (lite.dense_layers, lite.moe.moe_layers, lite.moe.shared_intermediate_size) == (
        1,
        26,
        2816,
    )
    assert (v3.dense_layers, v3.moe.moe_layers, v3.moe.router_bias) == (3, 58, True)


def test_deepseek_v3_fits_eight_141gb_cards_but_not_eight_80gb() -> None:
    config = load("deepseek-v3.json")

    h100 = plan(config, PlanRequest(80 * GIB, 8, max_model_len=32768))
    h200 = plan(config, PlanRequest(141 * GIB, 8, max_model_len=32768))

    assert not h100.fits
    assert (h200.fits, h200.tensor_parallel_size) == (True, 8)


# --- start-up -----------------------------------------------------------------------------------


def test_startup_estimate_follows_the_read_throughput() -> None:
    slow = startup_estimate(141 * 10**9, PlanRequest(40 * GIB, 4, read_bytes_per_second=2e8))
    fast = startup_estimate(141 * 10**9, PlanRequest(40 * GIB, 4, read_bytes_per_second=7e9))

    assert slow.read_s == 705
    assert fast.read_s == 21
    assert slow.health_start_period_s > 900  # the field report's 900 s was not enough margin
    assert slow.engine_ready_timeout_s > VLLM_DEFAULT_ENGINE_READY_TIMEOUT_S
    assert slow.environment() == {"VLLM_ENGINE_READY_TIMEOUT_S": str(slow.engine_ready_timeout_s)}
    assert fast.health_start_period_s >= MIN_HEALTH_START_PERIOD_S


def test_enforce_eager_skips_compile_and_graph_time() -> None:
    eager = startup_estimate(16 * 10**9, PlanRequest(80 * GIB, 1, enforce_eager=True))
    compiled = startup_estimate(16 * 10**9, PlanRequest(80 * GIB, 1))

    assert eager.compile_s == eager.cuda_graph_s == 0
    assert compiled.total_s - eager.total_s == compiled.compile_s + compiled.cuda_graph_s


def test_plan_json_has_the_stable_shape() -> None:
    result = plan(load("llama-3.1-8b-instruct.json"), PlanRequest(24 * GIB, 1))

    assert list(result.as_json()) == [
        "parameter_count", "weights_bytes", "kv_bytes_per_token", "valid_tensor_parallel_sizes",
        "tensor_parallel_size", "fits", "max_model_len", "max_model_len_supported", "per_gpu",
        "reasons", "suggestions", "startup_estimate_s", "health_start_period_s",
    ]  # fmt: skip
    assert list(result.as_json()["per_gpu"]) == [
        "budget_bytes", "weights_bytes", "kv_cache_bytes", "overhead_bytes",
    ]  # fmt: skip
    json.dumps(result.as_json())


def test_planner_imports_without_django() -> None:
    code = (
        "import sys; import deployments.planning; "
        "sys.exit(any(name.startswith('django') for name in sys.modules))"
    )

    completed = subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, check=False)

    assert completed.returncode == 0
