"""Berth's diagnosis of the real CPU engine's own failure logs.

Each log in ``tests/fixtures/engine-logs/vllm-0.32-cpu/`` was produced by running the real image
(``manage.py capture_engine_fixtures``) with the ``docker run`` line and trigger that
``captures.json`` records beside it; the code there is the diagnosis a person reading the log
would give, and Berth must give it first.
"""

from __future__ import annotations

import json

import pytest

from deployments.runtime.diagnostics import diagnose
from deployments.runtime.engine_captures import CASES, fixtures_readme
from tests.conftest import BASE_DIR

CAPTURES = BASE_DIR / "tests" / "fixtures" / "engine-logs" / "vllm-0.32-cpu"
MANIFEST = json.loads((CAPTURES / "captures.json").read_text())
# What the issue asks to cover, by case: each must have a real log.
REQUIRED = {
    "healthy", "context-too-long", "unsupported-architecture", "broken-tokenizer",
    "missing-shard", "memory-limit-oom-kill", "worker-crash-after-ready",
    "worker-signal-sigsegv", "start-timeout",
}  # fmt: skip


def test_every_required_failure_has_a_real_log_and_its_command() -> None:
    assert set(MANIFEST) >= REQUIRED
    for name, entry in MANIFEST.items():
        assert (CAPTURES / entry["log_file"]).stat().st_size > 1000, name
        assert entry["command"].startswith("docker run --detach --name "), name
        assert "berth/vllm-cpu:0.32.0-" in entry["command"], name
        assert entry["trigger"], name


def test_the_manifest_matches_the_capture_cases() -> None:
    """A case changed in the code without capturing again shows here."""
    for name, entry in MANIFEST.items():
        assert entry["code"] == CASES[name].code, name
        assert entry["trigger"] == CASES[name].trigger, name


# Stopped at a deadline while still starting: the log itself holds no failure; the diagnosis is
# Berth's stall timer's (launcher.stalled_finding, tested on the real engine in test_vllm_engine).
STOPPED_BY_BERTH = {"start-timeout"}


@pytest.mark.parametrize("name", sorted(set(MANIFEST) - STOPPED_BY_BERTH))
def test_the_real_log_is_diagnosed_with_its_code(name: str) -> None:
    entry = MANIFEST[name]
    log = (CAPTURES / entry["log_file"]).read_text()
    limited = "--memory " in entry["command"]
    findings = diagnose(
        log, exit_code=entry["exit_code"], oom_killed=entry["oom_killed"], memory_limited=limited
    )
    assert findings[0].code == entry["code"], [f.code for f in findings]
    assert findings[0].remedy


def test_a_start_stopped_at_its_deadline_shows_no_failure_of_its_own() -> None:
    entry = MANIFEST["start-timeout"]
    log = (CAPTURES / entry["log_file"]).read_text()
    assert entry["ready_after_s"] is None
    assert entry["after_ready"].startswith("stalled 5 s after 'Warming up model")
    assert "Warming up model for the compilation" in log
    # As the watcher does for a stall: the log only (the exit code is its own docker stop's).
    assert [f.code for f in diagnose(log)] == ["none"]


def test_a_crash_after_ready_ends_the_container_with_exit_code_0() -> None:
    """vLLM 0.32's API server shuts down cleanly when its engine core dies, so the container's
    exit code says nothing: the watcher must fail a deployment whose container exited at all."""
    assert MANIFEST["worker-crash-after-ready"]["exit_code"] == 0
    assert MANIFEST["worker-crash-after-ready"]["ready_after_s"] is not None


def test_the_directory_index_is_the_one_the_capture_writes() -> None:
    assert (CAPTURES / "README.md").read_text() == fixtures_readme(MANIFEST)
