"""Model inspection on real directories: every finding code, exact parameter counts, the CLI."""

from __future__ import annotations

import json
import os
import struct
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from models_registry.inspection import Inspection, inspect_directory
from tests.model_dirs import (
    LFS_POINTER,
    LLAMA_CONFIG,
    llama_tensors,
    parameter_count,
    write_model,
    write_safetensors,
)


def codes(report: Inspection) -> dict[str, str]:
    return {finding.code: str(finding.severity) for finding in report.findings}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A complete, valid tiny Llama directory under a storage root ``tmp_path/storage``."""
    directory = tmp_path / "storage" / "team-a" / "tiny-llama"
    write_model(directory)
    return directory


def test_a_complete_model_is_ok_with_an_exact_parameter_count(model: Path) -> None:
    report = inspect_directory(model, storage_root=model.parent.parent)
    tensors = llama_tensors()
    assert report.findings == []
    assert report.ok
    assert (report.architecture, report.model_type) == ("LlamaForCausalLM", "llama")
    assert (
        report.parameter_count
        == parameter_count(tensors)
        == 2 * 128 * 64 + 64 + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64)
    )
    # position_ids (I64) is a buffer: counted in the bytes, not in the parameters.
    assert report.dtypes == {"BF16": report.parameter_count * 2, "I64": 2048 * 8}
    assert report.weights_bytes == report.parameter_count * 2 + 2048 * 8
    assert report.tokenizer == {
        "kind": "tokenizers",
        "files": ["tokenizer.json", "tokenizer_config.json"],
    }


def test_sharded_checkpoint_is_checked_against_its_index(tmp_path: Path) -> None:
    write_model(tmp_path / "m", shards=3)
    report = inspect_directory(tmp_path / "m")
    assert report.ok, report.findings
    assert report.parameter_count == parameter_count(llama_tensors())


def test_seed_case_dummy_configs_and_missing_tokenizer_model_are_errors_with_remedies(
    tmp_path: Path,
) -> None:
    """The field report's lesson 1: placeholder '{}' files and no tokenizer.model."""
    directory = tmp_path / "llama-70b"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer_config.json").write_text("{}")
    write_safetensors(directory / "model.safetensors", llama_tensors())
    report = inspect_directory(directory)
    assert not report.ok
    found = {finding.code: finding for finding in report.findings}
    assert found["config-empty"].severity == "error"
    assert "TypeError: not a string" in found["config-empty"].remedy
    assert found["tokenizer-missing"].severity == "error"
    assert "tokenizer.model" in found["tokenizer-missing"].remedy
    assert "tokenizer-empty" in found  # tokenizer_config.json is '{}' too


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda d: (d / "config.json").unlink(), "config-missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config-invalid"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config-invalid"),
        (lambda d: (d / "config.json").write_text('{"hidden_size": 64}'), "config-invalid"),
        (lambda d: (d / "config.json").write_text(""), "config-empty"),
        (lambda d: (d / "config.json").write_text(LFS_POINTER), "config-empty"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer-missing"),
        (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer-missing"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer-empty"),
        (lambda d: (d / "tokenizer.json").write_text(LFS_POINTER), "tokenizer-empty"),
        (lambda d: (d / "tokenizer.json").write_text("{truncated"), "tokenizer-invalid"),
        (lambda d: (d / "model.safetensors").unlink(), "weights-missing"),
        (lambda d: (d / "model.safetensors").write_text(LFS_POINTER), "weights-lfs-pointer"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x05\x00"),
            "safetensors-header-invalid",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_broken_file_gives_its_error(model: Path, change, code: str) -> None:
    change(model)
    report = inspect_directory(model)
    assert codes(report).get(code) == "error", report.findings
    assert not report.ok
    assert all(finding.remedy for finding in report.findings)


def test_sentencepiece_tokenizer_counts_and_empty_one_does_not(model: Path) -> None:
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.model").write_bytes(b"\x0a\x0b sentencepiece model bytes")
    assert inspect_directory(model).tokenizer["kind"] == "sentencepiece"
    (model / "tokenizer.model").write_bytes(b"")
    assert codes(inspect_directory(model)).get("tokenizer-empty") == "error"


def test_missing_chat_template_is_only_a_warning(model: Path) -> None:
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    report = inspect_directory(model)
    assert codes(report) == {"chat-template-missing": "warning"}
    assert report.ok
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert inspect_directory(model).findings == []


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"not json", "not JSON"),
        (
            json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 4]}}).encode(),
            "do not match",
        ),
        (
            json.dumps({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}).encode(),
            "unknown dtype",
        ),
        (json.dumps({"w": {"dtype": "F32", "shape": [4]}}).encode(), "lacks a valid"),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(),
            "past the end",
        ),
    ],
)
def test_safetensors_headers_are_validated_without_reading_tensor_data(
    model: Path, header: bytes, why: str
) -> None:
    path = model / "model.safetensors"
    data = b"\0" * 8 if b"past the end" not in why.encode() else b""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    found = {finding.code: finding for finding in inspect_directory(model).findings}
    assert why in found["safetensors-header-invalid"].message


def test_header_length_larger_than_the_file_is_refused(model: Path) -> None:
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "does not fit" in inspect_directory(model).findings[0].message


def test_index_naming_a_missing_shard_or_tensor(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    write_model(directory, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    report = inspect_directory(directory)
    assert codes(report)["shard-missing"] == "error"
    assert "model-00002-of-00002.safetensors is listed" in report.findings[0].message
    assert report.parameter_count is not None  # only the present shard: not the exact count
    write_model(directory, shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    report = inspect_directory(directory)
    assert "1 tensors listed" in report.findings[0].message


def test_stray_shard_and_missing_index_are_warnings(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    write_model(directory, shards=2)
    write_safetensors(directory / "extra.safetensors", {"x": ("F16", (2,))})
    assert codes(inspect_directory(directory)) == {"shard-unreferenced": "warning"}
    (directory / "model.safetensors.index.json").unlink()
    assert codes(inspect_directory(directory)) == {"index-missing": "warning"}


def test_pickle_only_checkpoint_is_flagged_with_its_size(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02" + b"\0" * 4000)
    report = inspect_directory(model)
    assert codes(report) == {"weights-pickle-only": "warning"}
    assert (report.weights_bytes, report.parameter_count, report.weights_format) == (
        4002,
        None,
        "pytorch-bin",
    )
    (model / "pytorch_model.bin").write_text(LFS_POINTER)
    assert codes(inspect_directory(model))["weights-lfs-pointer"] == "error"


def test_missing_directory_and_unreadable_file(tmp_path: Path, model: Path) -> None:
    assert codes(inspect_directory(tmp_path / "absent")) == {"path-not-found": "error"}
    (model / "config.json").unlink()
    os.symlink(tmp_path / "nowhere.json", model / "config.json")  # a dangling link cannot be read
    found = codes(inspect_directory(model))
    assert found["file-unreadable"] == "error"


def test_symlink_escaping_the_storage_root_is_an_error(tmp_path: Path, model: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    os.symlink(outside, model / "extra.bin")
    os.symlink(model / "config.json", model / "config-link.json")  # inside: fine
    report = inspect_directory(model, storage_root=tmp_path / "storage")
    assert codes(report) == {"symlink-escapes-storage": "error"}
    assert "extra.bin links to" in report.findings[0].message


def test_model_directory_that_is_itself_a_link_outside_storage(tmp_path: Path, model: Path) -> None:
    storage = tmp_path / "storage"
    os.symlink(model, storage / "team-a" / "alias")  # inside: ok
    assert inspect_directory(storage / "team-a" / "alias", storage_root=storage).ok
    elsewhere = tmp_path / "elsewhere"
    write_model(elsewhere)
    os.symlink(elsewhere, storage / "team-a" / "escape")
    assert codes(inspect_directory(storage / "team-a" / "escape", storage_root=storage)) == {
        "path-outside-storage": "error"
    }


def test_inspection_never_writes_to_the_directory(model: Path) -> None:
    (model / "config.json").write_text("{}")
    before = {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in model.iterdir()}
    inspect_directory(model)
    assert {
        path: (path.stat().st_mtime_ns, path.stat().st_size) for path in model.iterdir()
    } == before


def test_inspect_model_cli_prints_the_stable_json_shape(model: Path) -> None:
    out = StringIO()
    call_command("inspect_model", str(model), "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert list(result) == [
        "path",
        "architecture",
        "model_type",
        "parameter_count",
        "weights_bytes",
        "dtypes",
        "tokenizer",
        "findings",
        "ok",
    ]
    assert result["ok"] is True
    assert result["parameter_count"] == parameter_count(llama_tensors())
    assert result["tokenizer"] == {
        "kind": "tokenizers",
        "files": ["tokenizer.json", "tokenizer_config.json"],
    }


def test_inspect_model_cli_reports_findings_in_the_stable_json_shape(tmp_path: Path) -> None:
    out = StringIO()
    call_command("inspect_model", str(tmp_path), "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["ok"] is False
    assert {"config-missing", "tokenizer-missing", "weights-missing"} <= {
        f["code"] for f in result["findings"]
    }
    assert (result["parameter_count"], result["weights_bytes"]) == (None, None)
    assert all(set(f) == {"code", "severity", "message", "remedy"} for f in result["findings"])


def test_config_keys_are_read_not_trusted_for_counts(model: Path) -> None:
    config = dict(LLAMA_CONFIG, num_hidden_layers=80)  # lies about size; headers are the truth
    (model / "config.json").write_text(json.dumps(config))
    assert inspect_directory(model).parameter_count == parameter_count(llama_tensors())
