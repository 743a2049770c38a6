"""The one registry of periodic jobs: filled by the apps, run by the agents, and no job anywhere
queued by a string name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from audit.jobs import scheduled_verification
from core.periodic import Scope, registered
from deployments.runtime.jobs import gc_job, reconcile_job
from gpus.jobs import compact_host_history
from models_registry.jobs import sync_due_mounts
from tests.conftest import BASE_DIR

ENQUEUE_CALLS = {"enqueue", "enqueue_in", "enqueue_at", "enqueue_call"}
SKIPPED = {".venv", ".git", "var", "node_modules"}


def test_the_apps_fill_the_registry_from_their_ready() -> None:
    host = {job.func for job in registered(Scope.HOST)}
    console = {job.func for job in registered(Scope.CONSOLE)}
    assert {compact_host_history, reconcile_job, gc_job} <= host
    assert {scheduled_verification, sync_due_mounts} <= console
    (gc,) = [job for job in registered() if job.func is gc_job]
    assert gc.first_after_s is None  # engines settle before the first collection


def test_every_interval_follows_its_setting(settings) -> None:
    jobs = {job.func: job for job in registered()}
    settings.BERTH_RECONCILE_INTERVAL_S = 17
    settings.BERTH_GC_INTERVAL_H = 0
    assert jobs[reconcile_job].interval_s() == 17
    assert jobs[gc_job].interval_s() == 0  # off: only on demand from the admin


def _string_enqueues(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        strings = [
            arg.value
            for arg in node.args[:3]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "." in arg.value
        ]
        if name in ENQUEUE_CALLS and strings:
            found.append(f"{path.relative_to(BASE_DIR)}:{node.lineno} {strings[0]}")
    return found


@pytest.mark.parametrize("tree", ["code", "tests"])
def test_no_job_is_queued_by_a_string_name(tree: str) -> None:
    paths = [
        path
        for path in BASE_DIR.rglob("*.py")
        if not SKIPPED & set(path.relative_to(BASE_DIR).parts)
        and (path.relative_to(BASE_DIR).parts[0] == "tests") == (tree == "tests")
    ]
    assert len(paths) > 50
    assert [hit for path in paths for hit in _string_enqueues(path)] == []
