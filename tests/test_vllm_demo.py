"""``BERTH_DEMO=1 make run`` on the real engine: the demo builds (here: finds) the CPU vLLM image,
deploys its tiny model by itself, and the console ends with a real chat completion answered
through Berth. (Engines outlive the console by design; the test removes its own.)"""

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
        try_it = console.wait_for("Try it yourself: curl http://127.0.0.1:", 5)
    finally:
        console.process.send_signal(signal.SIGINT)
        console.process.wait(timeout=90)
        output = console.rest()
        console.process.stdout.close()
        for container in docker_client.containers.list(
            all=True, filters={"label": f"berth.instance={TEST_INSTANCE}demo"}
        ):
            container.remove(force=True)
        for volume in docker_client.volumes.list(filters={"name": f"{TEST_INSTANCE}demo-cache-"}):
            volume.remove(force=True)
    assert "(16 tokens; random text, its weights are random)" in answer, output
    assert "/v1/chat/completions" in try_it
    assert "Berth stopped." in output
