"""The watcher's milestones come from the real engines' own lines: the CPU engine's captured
start-ups (``tests/fixtures/engine-logs/vllm-0.32-cpu/``) and the real GPU logs of the diagnosis
corpus; and the stand-in prints no milestone line that a real engine does not print, so the two
cannot drift apart."""

from __future__ import annotations

import re
from typing import Any

import pytest

from deployments.runtime.milestones import MILESTONES, milestone
from tests.conftest import BASE_DIR
from tests.engine_image import logs, running_engine, wait_until

CPU_LOGS = BASE_DIR / "tests" / "fixtures" / "engine-logs" / "vllm-0.32-cpu"
CORPUS = BASE_DIR / "tests" / "fixtures" / "diagnosis-corpus"
# vLLM's prefix: "(EngineCore pid=21) INFO 12-05 21:03:53 [kv_cache_utils.py:2327] "
PREFIX = re.compile(r"^(?:\([\w-]+ pid=\d+\)\s+)?(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]+\]\s+)?")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def real_lines() -> list[str]:
    lines: list[str] = []
    for path in [*CPU_LOGS.glob("*.log"), *CORPUS.glob("*.log")]:
        lines += path.read_text(errors="replace").splitlines()
    return lines


def shape(line: str) -> str:
    """A log line's message with vLLM's prefix and every number taken out."""
    return " ".join(NUMBER.sub("N", PREFIX.sub("", line.strip())).split())


def milestones_of(path_name: str) -> list[str]:
    text = (CPU_LOGS / path_name).read_text()
    return [message for line in text.splitlines() if (message := milestone(line))]


def test_a_real_cpu_start_is_followed_milestone_by_milestone() -> None:
    seen = milestones_of("healthy.log")
    assert "loading weights: 100%" in seen  # the bar is on stderr: before or after the next line
    expected = [
        "weights loaded in ",
        "compiling the model",
        "compiled and warmed up",
        "CPU KV cache space: 1.0 GiB of ",
        "KV cache holds 1,048,576 tokens",
        "engine initialised in ",
        "server started",
    ]
    positions = [next(i for i, m in enumerate(seen) if m.startswith(e)) for e in expected]
    assert positions == sorted(positions), seen


@pytest.mark.parametrize(("pattern", "template"), MILESTONES, ids=[t for _, t in MILESTONES])
def test_every_milestone_is_a_line_a_real_engine_printed(
    pattern: re.Pattern, template: str
) -> None:
    assert any(pattern.search(line) for line in real_lines()), f"no real log has {pattern.pattern}"


@pytest.mark.docker
def test_the_stand_in_prints_no_milestone_a_real_engine_does_not(
    docker_client: Any, engine_image: str
) -> None:
    """Each milestone line of a stand-in start has the shape (numbers aside) of a real line."""
    real = {shape(line) for line in real_lines() if milestone(line)}
    args = ["--model", "/models/tiny", "--served-model-name", "tiny"]
    with running_engine(docker_client, engine_image, args, {"ENGINE_LOAD_SECONDS": "1"}) as engine:
        wait_until(lambda: "Application startup complete" in logs(engine), timeout=60)
        printed = [line for line in logs(engine).splitlines() if milestone(line)]
    assert len(printed) >= 5
    unreal = [line for line in printed if shape(line) not in real]
    assert unreal == [], f"the stand-in prints milestones no real engine printed: {unreal}"
