"""``manage.py plan`` (issue 5, item 6) and the safetensors header reader behind ``--model-dir``.

The stable interface is the flags and the ``--json`` keys; checks outside the test suite use it.
Safetensors files here are real ones, written byte for byte by ``write_safetensors`` (8-byte
little-endian header length, JSON header, zeroed tensor data), so the exact-count path runs on
the format itself. Configs are the published ones described in ``tests/test_planner.py``.
"""

from __future__ import annotations

import json
import math
import struct
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from deployments.planning import model_from_config, parameter_count_from_config
from deployments.planning.model_files import read_weights_summary

CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"
LLAMA_70B = CONFIGS / "llama-3.1-70b-instruct.json"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}
JSON_KEYS = [
    "parameter_count", "weights_bytes", "kv_bytes_per_token", "valid_tensor_parallel_sizes",
    "tensor_parallel_size", "fits", "max_model_len", "max_model_len_supported", "per_gpu",
    "reasons", "suggestions", "startup_estimate_s", "health_start_period_s",
]  # fmt: skip
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def run_plan(*args: str) -> str:
    """``manage.py plan`` with ``args``; its standard output."""
    out = StringIO()
    call_command("plan", *args, stdout=out)
    return out.getvalue()


def plan_json(*args: str) -> dict[str, Any]:
    """``manage.py plan ... --json``, parsed."""
    return json.loads(run_plan(*args, "--json"))


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file: name -> (dtype, shape), data zero-filled."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def tiny_llama_tensors(dtype: str) -> list[dict[str, tuple[str, list[int]]]]:
    """The tensors of TINY_LLAMA, as Hugging Face names them, in two shards."""
    shards: list[dict[str, tuple[str, list[int]]]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = (dtype, [256, 64])
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        shards[layer].update({
            prefix + "self_attn.q_proj.weight": (dtype, [64, 64]),
            prefix + "self_attn.k_proj.weight": (dtype, [32, 64]),
            prefix + "self_attn.v_proj.weight": (dtype, [32, 64]),
            prefix + "self_attn.o_proj.weight": (dtype, [64, 64]),
            prefix + "mlp.gate_proj.weight": (dtype, [128, 64]),
            prefix + "mlp.up_proj.weight": (dtype, [128, 64]),
            prefix + "mlp.down_proj.weight": (dtype, [64, 128]),
            prefix + "input_layernorm.weight": (dtype, [64]),
            prefix + "post_attention_layernorm.weight": (dtype, [64]),
        })  # fmt: skip
    shards[1]["model.norm.weight"] = (dtype, [64])
    shards[1]["lm_head.weight"] = (dtype, [256, 64])
    return shards


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A model directory: TINY_LLAMA's config.json and its BF16 weights in two shards."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    for index, tensors in enumerate(tiny_llama_tensors("BF16"), start=1):
        write_safetensors(tmp_path / f"model-0000{index}-of-00002.safetensors", tensors)
    return tmp_path


# --- the JSON shape and the field report's case ---------------------------------------------------


def test_json_has_exactly_the_documented_keys_and_fits_70b_at_tp_4_with_8k() -> None:
    result = plan_json("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4",
                       "--max-model-len", "8192")  # fmt: skip

    assert list(result) == JSON_KEYS
    assert list(result["per_gpu"]) == ["budget_bytes", "weights_bytes", "kv_cache_bytes",
                                       "overhead_bytes"]  # fmt: skip
    assert result["parameter_count"] == 70_553_706_496
    assert result["weights_bytes"] == 141_107_412_992
    assert result["kv_bytes_per_token"] == 327_680
    assert result["valid_tensor_parallel_sizes"] == [1, 2, 4]
    assert (result["tensor_parallel_size"], result["fits"]) == (4, True)
    assert result["max_model_len"] == 8192
    assert result["max_model_len_supported"] > 8192
    assert result["suggestions"] == []
    assert result["health_start_period_s"] >= result["startup_estimate_s"]


def test_without_max_model_len_the_models_own_maximum_is_planned_and_refused() -> None:
    result = plan_json("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4")

    assert result["max_model_len"] == 131072
    assert (result["tensor_parallel_size"], result["fits"]) == (None, False)
    supported = result["max_model_len_supported"]
    assert 8192 < supported < 131072
    assert any(f"--max-model-len {supported}" in text for text in result["suggestions"])
    assert any("--kv-cache-dtype fp8" in text for text in result["suggestions"])


def test_tp_flag_evaluates_that_size_instead_of_choosing() -> None:
    result = plan_json("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4",
                       "--max-model-len", "8192", "--tp", "2")  # fmt: skip

    assert (result["tensor_parallel_size"], result["fits"]) == (None, False)
    assert result["per_gpu"]["weights_bytes"] > result["per_gpu"]["budget_bytes"]
    assert result["max_model_len_supported"] == 0


def test_kv_cache_dtype_and_utilization_flags_reach_the_planner() -> None:
    base = ("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4",
            "--max-model-len", "8192")  # fmt: skip

    default = plan_json(*base)
    tuned = plan_json(*base, "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.95")

    assert tuned["kv_bytes_per_token"] * 2 == default["kv_bytes_per_token"]
    assert tuned["per_gpu"]["budget_bytes"] > default["per_gpu"]["budget_bytes"]
    assert tuned["max_model_len_supported"] > 2 * default["max_model_len_supported"]


def test_gqa_model_with_eight_gpus_lists_only_the_tp_sizes_its_heads_allow() -> None:
    result = plan_json("--config", str(CONFIGS / "qwen2.5-7b-instruct.json"),
                       "--gpu-memory-gib", "24", "--gpus", "8")  # fmt: skip

    assert result["valid_tensor_parallel_sizes"] == [1, 2, 4]
    assert result["tensor_parallel_size"] == 1


def test_text_output_explains_the_plan_for_people() -> None:
    text = run_plan("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4",
                    "--max-model-len", "8192")  # fmt: skip

    assert "plan: TP 4, max_model_len 8192" in text
    assert "TP 2 refused: weights take 65.7 GiB" in text
    assert "VLLM_ENGINE_READY_TIMEOUT_S=" in text


# --- --model-dir: exact counts from safetensors headers ------------------------------------------


def test_header_reader_counts_exactly_what_the_config_formula_predicts(tiny_model: Path) -> None:
    summary = read_weights_summary(tiny_model)
    expected = parameter_count_from_config(model_from_config(TINY_LLAMA))

    assert summary is not None
    assert summary.parameter_count == expected == 2 * 256 * 64 + 2 * 36_992 + 64
    assert summary.weights_bytes == 2 * expected
    assert dict(summary.dtypes) == {"BF16": 2 * expected}


def test_model_dir_plans_from_exact_counts(tiny_model: Path) -> None:
    result = plan_json("--model-dir", str(tiny_model), "--gpu-memory-gib", "24", "--gpus", "1")

    assert result["parameter_count"] == 106_816
    assert result["weights_bytes"] == 2 * 106_816
    assert (result["tensor_parallel_size"], result["max_model_len"]) == (1, 2048)
    assert not any("computed from config.json" in reason for reason in result["reasons"])


def test_float32_checkpoint_counts_parameters_once_and_loads_16_bit(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, "torch_dtype": "float32"}))
    for index, tensors in enumerate(tiny_llama_tensors("F32"), start=1):
        write_safetensors(tmp_path / f"model-0000{index}-of-00002.safetensors", tensors)
    summary = read_weights_summary(tmp_path)

    result = plan_json("--model-dir", str(tmp_path), "--gpu-memory-gib", "24", "--gpus", "1")

    assert summary is not None
    assert summary.weights_bytes == 4 * 106_816
    assert result["parameter_count"] == 106_816
    assert result["weights_bytes"] == 2 * 106_816


def test_integer_buffers_are_not_parameters(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {
        "w": ("BF16", [10, 10]), "position_ids": ("I64", [1, 4]),
    })  # fmt: skip

    summary = read_weights_summary(tmp_path)

    assert summary is not None
    assert summary.parameter_count == 100
    assert summary.weights_bytes == 200 + 32


def test_model_dir_without_safetensors_plans_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))

    result = plan_json("--model-dir", str(tmp_path), "--gpu-memory-gib", "24", "--gpus", "1")

    assert result["parameter_count"] == 106_816
    assert "computed from config.json" in result["reasons"][0]


# --- refusals -------------------------------------------------------------------------------------


def test_empty_config_is_a_command_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(CommandError, match="non-empty JSON object"):
        run_plan("--model-dir", str(tmp_path), "--gpu-memory-gib", "40", "--gpus", "1")


def test_missing_config_is_a_command_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        run_plan("--config", str(tmp_path / "nope.json"), "--gpu-memory-gib", "40", "--gpus", "1")


def test_truncated_safetensors_header_is_a_command_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{")

    with pytest.raises(CommandError, match=r"cannot count the weights: .*does not fit"):
        run_plan("--model-dir", str(tmp_path), "--gpu-memory-gib", "40", "--gpus", "1")


def test_unknown_dtype_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="unknown --dtype"):
        run_plan("--config", str(LLAMA_70B), "--gpu-memory-gib", "40", "--gpus", "4",
                 "--dtype", "int3")  # fmt: skip
