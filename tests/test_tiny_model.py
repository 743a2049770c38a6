"""The tiny models the real engine serves (``models_registry.tiny_model``): real random weights,
a byte-level BPE tokenizer trained here, a chat template; and the plain zero-filled model of the
fast tests, unchanged."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from deployments.planning.memory import parameter_count_from_config
from deployments.planning.shapes import model_from_config
from models_registry.inspection import inspect_directory
from models_registry.tasks import model_task
from models_registry.tiny_model import (
    SERVABLE_SHAPE,
    SPECIAL_TOKENS,
    write_model,
    write_servable_model,
)
from models_registry.tiny_tokenizer import CORPUS, byte_alphabet, encode, train_bpe


def _bf16_values(path: Path, name: str) -> list[float]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + length])[name]
    start, end = (8 + length + offset for offset in entry["data_offsets"])
    halves = raw[start:end]
    return [struct.unpack("<f", b"\0\0" + halves[i : i + 2])[0] for i in range(0, len(halves), 2)]


def test_byte_alphabet_is_reversible_and_printable() -> None:
    alphabet = byte_alphabet()
    assert len(set(alphabet.values())) == 256
    assert alphabet[ord(" ")] == "Ġ"
    assert alphabet[ord("a")] == "a"
    assert all(character.isprintable() for character in alphabet.values())


def test_training_is_deterministic_and_merges_frequent_words() -> None:
    first, second = train_bpe(CORPUS, 120), train_bpe(CORPUS, 120)
    assert first == second
    assert len(first.merges) == 120
    assert len(first.vocab) == 256 + 120
    assert "Ġthe" in first.vocab  # the corpus's most frequent word became one token
    assert encode(first, " the") == [first.vocab["Ġthe"]]


@pytest.mark.parametrize("text", ["Hello, world!", "ünïcödé 漢字\n\n tabs\tand  spaces", ""])
def test_any_text_encodes_to_known_ids_and_back(text: str) -> None:
    tokenizer = train_bpe(CORPUS, 60)
    ids = encode(tokenizer, text)
    by_id = {number: token for token, number in tokenizer.vocab.items()}
    to_byte = {character: byte for byte, character in byte_alphabet().items()}
    decoded = bytes(to_byte[c] for number in ids for c in by_id[number]).decode()
    assert decoded == text


def test_servable_model_is_deployable_and_counted_exactly(tmp_path: Path) -> None:
    parameters = write_servable_model(tmp_path / "chat")
    report = inspect_directory(tmp_path / "chat")
    assert report.ok, report.findings
    assert report.architecture == "LlamaForCausalLM"
    assert report.parameter_count == parameters
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert parameter_count_from_config(model_from_config(config)) == parameters
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # CPU attention's minimum
    assert config["head_dim"] == 64


def test_servable_model_has_random_finite_weights_and_unit_norms(tmp_path: Path) -> None:
    write_servable_model(tmp_path / "chat", seed=7)
    path = tmp_path / "chat" / "model.safetensors"
    weights = _bf16_values(path, "model.layers.0.mlp.up_proj.weight")
    assert len(weights) == SERVABLE_SHAPE["intermediate"] * SERVABLE_SHAPE["hidden"]
    assert all(math.isfinite(value) for value in weights)
    mean = sum(weights) / len(weights)
    std = math.sqrt(sum((value - mean) ** 2 for value in weights) / len(weights))
    assert abs(mean) < 0.001
    assert 0.018 < std < 0.022
    assert set(_bf16_values(path, "model.norm.weight")) == {1.0}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        write_servable_model(tmp_path / name, seed=seed)
    read = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert read["a"] == read["b"] != read["c"]


def test_tokenizer_files_name_the_special_tokens_and_a_chat_template(tmp_path: Path) -> None:
    write_servable_model(tmp_path / "chat")
    tokenizer = json.loads((tmp_path / "chat" / "tokenizer.json").read_text())
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    assert list(added) == SPECIAL_TOKENS
    assert max(tokenizer["model"]["vocab"].values()) < config["vocab_size"]
    assert config["eos_token_id"] == added["<|end|>"]
    tokenizer_config = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|end|>"


def test_embedding_model_has_no_lm_head(tmp_path: Path) -> None:
    parameters = write_servable_model(tmp_path / "embed", embedding=True)
    report = inspect_directory(tmp_path / "embed")
    assert report.ok, report.findings
    assert report.architecture == "LlamaModel"
    assert report.parameter_count == parameters
    assert not (tmp_path / "embed" / "generation_config.json").exists()


def test_plain_tiny_model_is_unchanged(tmp_path: Path) -> None:
    write_model(tmp_path / "plain")
    assert inspect_directory(tmp_path / "plain").ok


@pytest.mark.parametrize(
    ("architecture", "files", "task"),
    [
        ("LlamaForCausalLM", [], "generate"),
        ("GPT2LMHeadModel", [], "generate"),
        ("Qwen2VLForConditionalGeneration", [], "generate"),
        ("LlamaModel", [], "embed"),
        ("BertModel", [], "embed"),
        ("BgeM3EmbeddingModel", [], "embed"),
        ("XLMRobertaForSequenceClassification", ["modules.json"], "embed"),
        (None, [], "generate"),
    ],
)
def test_the_task_follows_the_architecture(
    architecture: str | None, files: list, task: str
) -> None:
    assert model_task(architecture, files) == task
