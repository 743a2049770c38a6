"""``BERTH_DEMO=1 make run`` on the real engine: the demo builds (here: finds) the CPU vLLM image,
deploys its tiny model by itself, and the console ends with a real chat completion answered
through Berth; the next ``make run`` answers with the same demo key. (Engines outlive the console
by design; the test removes its own.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_INSTANCE, clean_environ, which_or_skip
from tests.test_run_command import Console, _free_port

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.postgres,  # with the other vllm tests: on the PostgreSQL run only
    pytest.mark.xdist_group("vllm"),
    pytest.mark.timeout(900),
]


def test_make_run_with_the_demo_flag_ends_with_a_real_chat_completion(
    tmp_path: Path, vllm_image: str, docker_client: Any
) -> None:
    which_or_skip("redis-server")
    env = clean_environ("DATABASE_URL", "SECRET_KEY", "BERTH_ADMIN_PASSWORD")
    env.update(
        BERTH_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'berth.sqlite3'}",
        BERTH_PORT=str(_free_port()),
        BERTH_GATEWAY_PORT=str(_free_port()),
        REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0",
        BERTH_DEMO="1",
        BERTH_DEMO_ENGINE="vllm",
        BERTH_LOCAL_HOST_NAME="demo-laptop",
        BERTH_INSTANCE=TEST_INSTANCE + "demo",
        BERTH_AGENT_INTERVAL_S="2",
        PYTHONUNBUFFERED="1",
    )
    console = Console(env)
    try:
        console.wait_for(f"engine image 'vllm-cpu' ({vllm_image})", 120)
        console.wait_for("deployment 'tiny-chat': requested on the real engine", 60)
        console.wait_for("Berth is up at", 90)
        answer = console.wait_for("The demo model answered through Berth's gateway", 600)
        key_line = console.wait_for("The demo team's key", 5)
        try_it = console.wait_for("Try it yourself: curl http://127.0.0.1:", 5)
        first_output = _stop(console)
        # The next make run: the engine outlived the console; the same key answers again.
        console = Console(env)
        console.wait_for("deployment 'tiny-chat': already", 120)
        console.wait_for("The demo model answered through Berth's gateway", 300)
        key_again = console.wait_for("The demo team's key", 5)
    finally:
        output = _stop(console)
        for container in docker_client.containers.list(
            all=True, filters={"label": f"berth.instance={TEST_INSTANCE}demo"}
        ):
            container.remove(force=True)
        for volume in docker_client.volumes.list(filters={"name": f"{TEST_INSTANCE}demo-cache-"}):
            volume.remove(force=True)
    assert "(16 tokens; random text, its weights are random)" in answer, first_output
    assert "/v1/chat/completions" in try_it
    assert "Berth stopped." in first_output
    clear = key_line.rsplit(": ", 1)[1].strip()
    assert "(new;" in key_line
    assert "(the same as last time;" in key_again, output
    assert key_again.rsplit(": ", 1)[1].strip() == clear
    assert (tmp_path / "var" / "demo-gateway-key").stat().st_mode & 0o777 == 0o600


def _stop(console: Console) -> str:
    """Stop ``make run`` as Ctrl-C does; its whole output."""
    if console.process.poll() is None:
        console.process.send_signal(signal.SIGINT)
        console.process.wait(timeout=90)
    output = console.rest()
    console.process.stdout.close()
    return output
