"""``make run``'s terminal stays readable: RQ's per-job lines only with LOG_LEVEL; the closing
banner says where the logins were printed and how to change the port; a port in use names the
variable; SIGINT or SIGTERM sent to ``make`` alone stops the whole console, as Ctrl-C does."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import audit
from audit.actions import Action
from audit.jobs import verify_chain
from core.queues import get_queue
from tests.conftest import clean_environ, run_manage, subprocess_env, which_or_skip
from tests.test_run_command import Console, _alive, _free_port

pytestmark = [pytest.mark.redis]
JOBS = 3


@pytest.mark.django_db(transaction=True)
def test_worker_prints_no_line_per_job_unless_log_level_asks(tmp_path: Path) -> None:
    audit.record(Action.GC_RAN)
    queue = get_queue("default")
    env = {key: value for key, value in subprocess_env().items() if key != "LOG_LEVEL"}
    outputs = {}
    for level in (None, "info"):
        queue.empty()
        for _ in range(JOBS):
            queue.enqueue(verify_chain)
        run_env = env if level is None else {**env, "LOG_LEVEL": level}
        worker = run_manage("berth_worker", "default", "--burst", env=run_env)
        assert worker.returncode == 0, worker.stderr
        outputs[level] = worker.stdout + worker.stderr
    assert "Job OK" not in outputs[None]
    assert outputs[None].count("\n") < JOBS  # nothing per job
    assert outputs["info"].count("Job OK") == JOBS


@pytest.fixture
def console_env(tmp_path: Path) -> dict[str, str]:
    """A fresh console (its own var/, SQLite and Redis) on free ports."""
    which_or_skip("redis-server")
    env = clean_environ("DATABASE_URL", "SECRET_KEY", "BERTH_ADMIN_PASSWORD", "LOG_LEVEL")
    env.update(
        BERTH_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'berth.sqlite3'}",
        BERTH_PORT=str(_free_port()),
        REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0",
        BERTH_LOCAL_AGENT="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def test_a_port_in_use_names_the_variable_to_set(console_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        console_env["BERTH_PORT"] = str(port)
        result = run_manage("berth_up", env=console_env, timeout=60)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "BERTH_PORT" in result.stderr
    assert "Started redis-server" not in result.stdout  # refused before starting anything


@pytest.fixture
def make_run(console_env: dict[str, str]) -> Iterator[Console]:
    """``make run`` on the fresh console; whatever is left is killed afterwards."""
    make = which_or_skip("make")
    # BOOTSTRAP=: skips scripts/bootstrap: the test's .venv is installed already.
    console = Console(console_env, argv=[make, "--no-print-directory", "run", "BOOTSTRAP=:"])
    yield console
    console.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_make_alone_stops_everything_and_the_banner_helps(
    make_run: Console, sig: signal.Signals
) -> None:
    console = make_run
    console.wait_for("Berth is up at", 90)
    banner = console.wait_for("Press Ctrl-C to stop", 5)
    output = "".join(console.output)
    assert (
        "Sign in as admin: password printed above under 'Created the first admin account'" in output
    )
    assert "BERTH_PORT=" in output  # how to serve on another port
    assert banner
    (berth_up,) = _children(console.process.pid)  # manage.py berth_up, make's only child
    pids = [berth_up, *(int(pid) for pid in re.findall(r"\bpid (\d+)", output))]
    assert len(pids) >= 4  # berth_up, redis-server, web, worker (and the gateway)

    os.kill(console.process.pid, sig)  # make only: not its process group, as kill(1) does
    console.process.wait(timeout=40)
    deadline = time.monotonic() + 40
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], console.rest()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
