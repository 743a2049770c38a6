"""The scriptable commands exit as linters do: 0 ok, 1 a finding (or "does not fit"), 2 a usage
error; ``--json`` prints the same object whatever the status. Each runs as a real process.

Also the plan's per-GPU line: an equation that holds in the printed figures, also when nothing
fits.
"""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from hypothesis import given
from hypothesis import strategies as st

from deployments.management.commands.plan import budget_equation, tenths_adding_up
from deployments.planning import GIB, GpuMemory
from models_registry.inspection import inspect_directory
from models_registry.tiny_model import TOKENIZER_CONFIG
from tests.conftest import run_manage, subprocess_env
from tests.model_dirs import write_model

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_70B = FIXTURES / "model_configs" / "llama-3.1-70b-instruct.json"
LOGS = FIXTURES / "vllm_logs"


def manage(*args: str) -> tuple[int, str, str]:
    result = run_manage(*args, env=subprocess_env())
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--gpu-memory-gib", "80", "--gpus", "4", "--max-model-len", "8192"], 0),
        (["--gpu-memory-gib", "24", "--gpus", "1"], 1),  # 70B on one 24 GiB card
        (["--gpu-memory-gib", "80", "--gpus", "four"], 2),  # argparse
        (["--gpu-memory-gib", "80", "--gpus", "4", "--dtype", "int3"], 2),  # the planner's
    ],
)
def test_plan_exits_0_when_it_fits_1_when_it_does_not_and_2_on_bad_arguments(
    args: list[str], status: int
) -> None:
    code, out, err = manage("plan", "--config", str(LLAMA_70B), *args, "--json")
    assert code == status, err
    if status < 2:
        assert json.loads(out)["fits"] is (status == 0)  # --json unchanged by the status
    else:
        assert out == ""
        assert err.strip()


def test_plan_of_a_config_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = manage("plan", "--config", str(tmp_path / "nope.json"), "--gpu-memory-gib",
                          "80", "--gpus", "1")  # fmt: skip
    assert code == 2
    assert "cannot read" in err


def test_inspect_model_exits_1_for_a_model_that_cannot_be_deployed(tmp_path: Path) -> None:
    write_model(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    assert manage("inspect_model", str(tmp_path / "good"))[0] == 0
    code, out, _ = manage("inspect_model", str(tmp_path / "empty"), "--json")
    assert code == 1
    assert json.loads(out)["ok"] is False
    code, out, _ = manage("inspect_model", str(tmp_path / "no-such-dir"))
    assert code == 1  # a path that does not exist is a finding, not a usage error
    assert "NOT DEPLOYABLE" in out
    assert manage("inspect_model")[0] == 2  # no path: argparse


def test_inspect_model_strict_exits_1_on_warnings(tmp_path: Path) -> None:
    model = tmp_path / "no-chat-template"
    write_model(model)
    config = {key: value for key, value in TOKENIZER_CONFIG.items() if key != "chat_template"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    report = inspect_directory(model)
    assert report.ok  # deployable...
    assert report.findings  # ...with a warning
    assert manage("inspect_model", str(model))[0] == 0
    assert manage("inspect_model", str(model), "--strict")[0] == 1


def test_diagnose_exits_1_when_it_finds_a_failure_and_2_when_the_log_cannot_be_read(
    tmp_path: Path,
) -> None:
    assert manage("diagnose", str(LOGS / "healthy.log"))[0] == 0
    code, out, _ = manage("diagnose", str(LOGS / "oom-wrapped.log"), "--json")
    assert code == 1
    assert json.loads(out)["findings"][0]["code"] == "cuda-oom"
    code, out, err = manage("diagnose", str(tmp_path / "missing.log"))
    assert (code, out) == (2, "")
    assert "cannot read" in err
    assert manage("diagnose", str(tmp_path))[0] == 2  # a directory is not a log
    assert manage("diagnose", "--exit-code", "x", str(LOGS / "healthy.log"))[0] == 2


def test_in_process_calls_are_not_ended_by_the_status() -> None:
    """``call_command`` (tests, other commands) gets the output and no SystemExit."""
    out = StringIO()
    call_command("diagnose", str(LOGS / "oom-wrapped.log"), stdout=out)
    assert out.getvalue().startswith("cuda-oom")


# --- the plan's equation ------------------------------------------------------------------------


def _numbers(line: str) -> list[float]:
    return [float(number) for number in re.findall(r"\d+\.\d", line)]


def test_the_budget_equation_holds_when_nothing_fits() -> None:
    out = StringIO()
    call_command("plan", "--config", str(LLAMA_70B), "--gpu-memory-gib", "24", "--gpus", "1",
                 stdout=out)  # fmt: skip
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("per GPU")]
    assert "no memory left for the KV cache" in line
    weights, overhead, need, budget, short = _numbers(line.split(":", 1)[1])
    assert round(weights + overhead, 1) == need
    assert round(budget + short, 1) == need
    assert need > budget


def test_the_budget_equation_adds_up_when_it_fits() -> None:
    memory = GpuMemory(
        total_bytes=80 * GIB,
        budget_bytes=int(73.6 * GIB),
        weights_bytes=int(65.74 * GIB),
        activation_bytes=int(2.04 * GIB),
        non_torch_bytes=int(0.53 * GIB),
        cuda_graph_bytes=int(3.23 * GIB),
    )
    budget, weights, overhead, kv = _numbers(budget_equation(memory))
    assert round(weights + overhead + kv, 1) == budget


@given(st.lists(st.integers(min_value=0, max_value=200 * GIB), min_size=1, max_size=4))
def test_rounded_parts_add_up_and_stay_within_a_tenth(parts: list[int]) -> None:
    total, shown = tenths_adding_up(sum(parts), tuple(parts))
    assert sum(shown) == total
    assert all(
        abs(tenths - part / (GIB / 10)) < 1 for tenths, part in zip(shown, parts, strict=True)
    )
