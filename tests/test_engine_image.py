"""The stand-in engine image behaves like vLLM where Berth looks: CLI, logs, HTTP, failures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engine_image import (
    ENGINE_PORT,
    container_ip,
    engine_healthcheck,
    http_get,
    logs,
    probe_health,
    running_engine,
    wait_until,
)
from tests.model_dirs import LLAMA_CONFIG, write_model

pytestmark = pytest.mark.docker

MODEL = "/models/tiny-llama"
NAME = "tiny-chat"
ARGS = [
    "--model", MODEL,
    "--served-model-name", NAME,
    "--tensor-parallel-size", "1",
    "--max-model-len", "2048",
    "--gpu-memory-utilization", "0.5",
    "--port", str(ENGINE_PORT),
    "--enforce-eager",
    "--kv-cache-dtype=auto",
]  # fmt: skip
MILESTONES = [
    "non-default args:",
    "Loading safetensors checkpoint shards: 100% Completed",
    "Loading weights took",
    "Model loading took",
    "Available KV cache memory:",
    "GPU KV cache size:",
    "Capturing CUDA graphs",
    "Graph capturing finished in",
    "Starting vLLM server on http://0.0.0.0:8000",
    "Application startup complete.",
]
WRAPPER = (
    "RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {'EngineCore_DP0': 1}"
)


def exit_code(container: Any, timeout: float = 20) -> int:
    return container.wait(timeout=timeout)["StatusCode"]


def in_order(text: str, needles: list[str]) -> bool:
    position = 0
    for needle in needles:
        position = text.find(needle, position)
        if position < 0:
            return False
    return True


def test_refuses_connections_while_loading_then_is_healthy(
    docker_client: Any, engine_image: str
) -> None:
    env = {"ENGINE_LOAD_SECONDS": "2"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        host = container_ip(engine)
        assert probe_health(host) is None, "the port must refuse connections while loading"
        assert "Application startup complete." not in logs(engine)
        assert wait_until(lambda: probe_health(host) == 200, what="/health 200")
        status, _, body = http_get(host, "/health")
        assert (status, body) == (200, b"")
        text = logs(engine)
    assert in_order(text, MILESTONES), text
    args_line = next(line for line in text.splitlines() if "non-default args:" in line)
    assert args_line.startswith("(APIServer pid=1) INFO ")
    for echoed in (
        f"'model': '{MODEL}'",
        f"'served_model_name': ['{NAME}']",
        "'tensor_parallel_size': 1",
        "'max_model_len': 2048",
        "'gpu_memory_utilization': 0.5",
        "'enforce_eager': True",
        "'kv_cache_dtype': 'auto'",
    ):
        assert echoed in args_line


def test_answers_vllm_http_surface_and_stops_gracefully(
    docker_client: Any, engine_image: str
) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        host = container_ip(engine)
        wait_until(lambda: probe_health(host) == 200, what="/health 200")

        status, headers, body = http_get(host, "/v1/models")
        assert status == 200
        assert headers["content-type"] == "application/json"
        models = json.loads(body)
        assert models["object"] == "list"
        [card] = models["data"]
        assert card["id"] == NAME
        assert card["object"] == "model"
        assert card["owned_by"] == "vllm"
        assert card["root"] == MODEL
        assert card["max_model_len"] == 2048

        status, headers, body = http_get(host, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = body.decode()
        assert f'vllm:num_requests_running{{engine="0",model_name="{NAME}"}} 0.0' in metrics
        assert "# TYPE vllm:kv_cache_usage_perc gauge" in metrics
        assert "vllm:cache_config_info{" in metrics

        assert json.loads(http_get(host, "/version")[2])["version"].startswith("0.")
        assert http_get(host, "/no-such-route")[0] == 404

        engine.stop(timeout=5)
        assert exit_code(engine) == 0
        assert "Application shutdown complete." in logs(engine)


# (ENGINE_FAIL, the root cause line it prints, whether vLLM's generic wrapper follows it)
FAILURES = [
    ("cuda-oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB.", True),
    (
        "kv-cache-max-model-len",
        "ValueError: To serve at least one request with the model's max seq len (2048), "
        "(16.00 GiB KV cache is needed, which is larger than the available KV cache memory "
        "(1.50 GiB). Based on the available memory, the estimated maximum model length is 192.",
        True,
    ),
    ("kv-cache-no-memory", "ValueError: No available memory for the cache blocks.", True),
    (
        "gpu-memory-in-use",
        "ValueError: Free memory on device cuda:0 (12.31/79.19 GiB) on startup is less than "
        "desired GPU memory utilization (0.5, ",
        True,
    ),
    (
        "cache-dir-unwritable",
        "FileNotFoundError: [Errno 2] No such file or directory: '/root/.cache/vllm'",
        True,
    ),
    (
        "nccl-shm",
        "torch.distributed.DistBackendError: NCCL error in: "
        "/pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled system error",
        True,
    ),
    (
        "tp-heads-not-divisible",
        "ValueError: Total number of attention heads (28) must be divisible by tensor parallel "
        "size (8).",
        False,
    ),
    (
        "max-model-len-exceeds-config",
        "Value error, User-specified max_model_len (2048) is greater than the derived "
        "max_model_len (max_position_embeddings=1024",
        False,
    ),
    ("no-gpu-visible", "RuntimeError: Failed to infer device type", False),
    ("port-in-use", "OSError: [Errno 98] Address already in use", False),
]


@pytest.mark.parametrize(("mode", "root_cause", "wrapped"), FAILURES, ids=[f[0] for f in FAILURES])
def test_fails_like_vllm(
    docker_client: Any, engine_image: str, mode: str, root_cause: str, wrapped: bool
) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0", "ENGINE_FAIL": mode}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        assert exit_code(engine) == 1
        text = logs(engine)
    assert root_cause in text
    assert "Traceback (most recent call last):" in text
    assert "Application startup complete." not in text
    if wrapped:
        assert text.rindex(root_cause) < text.index(WRAPPER)
        assert text.splitlines()[-1].endswith(WRAPPER)
    else:
        assert "Engine core initialization failed" not in text
        assert root_cause in text.splitlines()[-1] or root_cause in text.splitlines()[-2]
    if mode == "cache-dir-unwritable":
        assert 'File "<frozen os>", line 225, in makedirs' in text


def test_oom_kill_exits_137_without_a_traceback(docker_client: Any, engine_image: str) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0", "ENGINE_FAIL": "oom-kill"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        assert exit_code(engine) == 137
        text = logs(engine)
    assert "Loading safetensors checkpoint shards:   0% Completed" in text
    assert "Traceback" not in text
    assert "Error" not in text


def test_hang_stops_progress_and_never_becomes_healthy(
    docker_client: Any, engine_image: str
) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0", "ENGINE_FAIL": "hang"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        host = container_ip(engine)
        wait_until(lambda: "0% Completed | 0/" in logs(engine), what="the first shard line")
        stalled = logs(engine)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # a window of polls: refused every time, no output
            assert probe_health(host) is None
            engine.reload()
            assert engine.status == "running"
            assert logs(engine) == stalled
            time.sleep(0.1)
        started = time.monotonic()
        engine.stop(timeout=10)  # SIGTERM ends it at once, as vLLM would
        assert exit_code(engine) == 143
        assert time.monotonic() - started < 5
    assert "Loading weights took" not in stalled


def test_hang_ends_with_vllms_ready_timeout_when_it_is_set(
    docker_client: Any, engine_image: str
) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0", "ENGINE_FAIL": "hang", "VLLM_ENGINE_READY_TIMEOUT_S": "1"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        assert exit_code(engine) == 1
        text = logs(engine)
    assert (
        "TimeoutError: Timed out waiting for engine core processes to start. This is often "
        "caused by slow weight loading for large models. Waited 1s (configured by "
        "VLLM_ENGINE_READY_TIMEOUT_S)."
    ) in text


def test_crash_after_ready_exits_after_being_healthy(docker_client: Any, engine_image: str) -> None:
    env = {"ENGINE_LOAD_SECONDS": "0", "ENGINE_CRASH_AFTER": "1"}
    with running_engine(docker_client, engine_image, ARGS, env) as engine:
        host = container_ip(engine)
        wait_until(lambda: probe_health(host) == 200, what="/health 200")
        assert exit_code(engine) == 1
        text = logs(engine)
    assert in_order(
        text,
        [
            "Application startup complete.",
            "EngineCore encountered a fatal error.",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
            "Application shutdown complete.",
        ],
    )


def test_the_launchers_health_check_command_works_in_the_image(
    docker_client: Any, engine_image: str
) -> None:
    healthcheck = {
        "test": engine_healthcheck(),
        "interval": 200_000_000,  # nanoseconds
        "timeout": 2_000_000_000,
        "retries": 3,
        "start_period": 10_000_000_000,
    }
    env = {"ENGINE_LOAD_SECONDS": "2"}  # room for the two checks made while it loads

    def health(engine: Any) -> str:
        engine.reload()
        return engine.attrs["State"]["Health"]["Status"]

    with running_engine(docker_client, engine_image, ARGS, env, healthcheck=healthcheck) as engine:
        assert health(engine) == "starting"
        refused = engine.exec_run(engine_healthcheck()[1:])
        assert refused.exit_code == 7, refused.output  # curl's "couldn't connect"
        wait_until(lambda: health(engine) == "healthy", what="Docker's health status")
        missing = engine.exec_run(["curl", "-fsS", "http://127.0.0.1:8000/no-such-route"])
        assert missing.exit_code == 22, missing.output  # curl -f on an HTTP error


def test_reads_the_mounted_model_like_vllm(
    docker_client: Any, engine_image: str, tmp_path: Path
) -> None:
    """config.json sets the default context and the head count; shards drive the progress."""
    write_model(tmp_path / "tiny", shards=3)
    volumes = {str(tmp_path / "tiny"): {"bind": MODEL, "mode": "ro"}}
    env = {"ENGINE_LOAD_SECONDS": "0"}
    args = ["--model", MODEL, "--served-model-name", NAME]
    with running_engine(docker_client, engine_image, args, env, volumes=volumes) as engine:
        host = container_ip(engine)
        wait_until(lambda: probe_health(host) == 200, what="/health 200")
        [card] = json.loads(http_get(host, "/v1/models")[2])["data"]
        text = logs(engine)
    assert card["max_model_len"] == LLAMA_CONFIG["max_position_embeddings"]
    assert "Loading safetensors checkpoint shards: 100% Completed | 3/3" in text
    assert "Resolved architecture: LlamaForCausalLM" in text

    heads = LLAMA_CONFIG["num_attention_heads"]
    with running_engine(
        docker_client, engine_image, [*args, "-tp", "3"], env, volumes=volumes
    ) as engine:
        assert exit_code(engine) == 1
        bad_tp = logs(engine)
    assert (
        f"ValueError: Total number of attention heads ({heads}) must be divisible by tensor "
        "parallel size (3)."
    ) in bad_tp

    with running_engine(
        docker_client, engine_image, [*args, "--max-model-len", "8192"], env, volumes=volumes
    ) as engine:
        assert exit_code(engine) == 1
        too_long = logs(engine)
    assert "User-specified max_model_len (8192) is greater than the derived max_model_len" in (
        too_long
    )


def test_an_unwritable_cache_directory_fails_for_real(
    docker_client: Any, engine_image: str
) -> None:
    """vLLM creates ~/.cache/vllm at start; a read-only root file system stops it there."""
    env = {"ENGINE_LOAD_SECONDS": "0"}
    with running_engine(docker_client, engine_image, ARGS, env, read_only=True) as engine:
        assert exit_code(engine) == 1
        text = logs(engine)
    assert "OSError: [Errno 30] Read-only file system: '/root/.cache/vllm'" in text
    assert 'File "<frozen os>", line 225, in makedirs' in text
    assert text.splitlines()[-1].endswith(WRAPPER)


def test_a_repeated_serve_is_vllms_argparse_error(docker_client: Any, engine_image: str) -> None:
    with running_engine(docker_client, engine_image, ["serve", *ARGS]) as engine:
        assert exit_code(engine) == 2
        text = logs(engine)
    assert "vllm: error: unrecognized arguments: serve" in text
