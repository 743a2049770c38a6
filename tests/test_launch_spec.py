"""The container template: a golden set of Docker kwargs, the equivalent `docker run` line built
from the same kwargs, and the real engine accepting them (and refusing GPUs it cannot give)."""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path
from typing import Any

import pytest

from deployments.launch_spec import LaunchSpec, container_kwargs, docker_run_argv, docker_run_line

SPEC = LaunchSpec(
    deployment_id=12,
    generation=3,
    team="team-a",
    image="vllm/vllm-openai@sha256:" + "ab" * 32,
    model_host_path="/mnt/ceph/models/team-a/Llama-3.3-70B-Instruct",
    model_container_path="/models/team-a/Llama-3.3-70B-Instruct",
    served_model_name="llama-70b",
    host_port=30012,
    gpu_device_ids=("GPU-4", "GPU-5", "GPU-6", "GPU-7"),
    tensor_parallel_size=4,
    max_model_len=8192,
    gpu_memory_utilization=0.9,
    environment={"VLLM_LOGGING_LEVEL": "INFO", "HOME": "/ignored"},
    health_start_period_s=900,
    engine_ready_timeout_s=1200,
)


def plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Docker SDK types are dict subclasses: compare them as plain dicts."""
    return {
        key: [dict(item) for item in value] if key in {"mounts", "device_requests"} else value
        for key, value in kwargs.items()
    }


def test_container_kwargs_equal_the_golden_template() -> None:
    """Any new Docker option must change this test: the template is reviewed, not grown."""
    assert plain(container_kwargs(SPEC)) == {
        "image": SPEC.image,
        "command": [
            "--model", "/models/team-a/Llama-3.3-70B-Instruct", "--served-model-name", "llama-70b",
            "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "4",  # noqa: S104
            "--max-model-len", "8192", "--gpu-memory-utilization", "0.9",
        ],
        "name": "berth-12-g3",
        "detach": True,
        "init": True,
        "labels": {"berth.managed": "true", "berth.instance": "berth", "berth.deployment": "12", "berth.generation": "3", "berth.team": "team-a"},
        "environment": {
            "VLLM_LOGGING_LEVEL": "INFO", "HOME": "/berth-cache", "XDG_CACHE_HOME": "/berth-cache",
            "VLLM_CACHE_ROOT": "/berth-cache/vllm", "HF_HOME": "/berth-cache/huggingface",
            "TRITON_CACHE_DIR": "/berth-cache/triton", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "VLLM_ENGINE_READY_TIMEOUT_S": "1200",
        },
        "mounts": [
            {"Target": "/models/team-a/Llama-3.3-70B-Instruct", "Source": "/mnt/ceph/models/team-a/Llama-3.3-70B-Instruct",
             "Type": "bind", "ReadOnly": True},
            {"Target": "/berth-cache", "Source": "berth-cache-12", "Type": "volume", "ReadOnly": False},
        ],
        "ports": {"8000/tcp": ("127.0.0.1", 30012)},
        "shm_size": 8 * 1024**3,
        "healthcheck": {
            "test": ["CMD", "curl", "-fsS", "http://127.0.0.1:8000/health"],
            "interval": 10 * 10**9, "timeout": 5 * 10**9, "retries": 3, "start_period": 900 * 10**9,
        },
        "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 2},
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": 4096,
        "log_config": {"type": "json-file", "config": {"max-size": "100m", "max-file": "3"}},
        "device_requests": [
            {"Driver": "", "Count": 0, "DeviceIDs": ["GPU-4", "GPU-5", "GPU-6", "GPU-7"],
             "Capabilities": [["gpu"]], "Options": {}}
        ],
    }  # fmt: skip


def test_docker_run_line_quotes_the_gpu_list_like_the_field_report() -> None:
    line = docker_run_line(container_kwargs(SPEC))
    assert "--gpus '\"device=GPU-4,GPU-5,GPU-6,GPU-7\"'" in line
    assert (
        "--mount type=bind,source=/mnt/ceph/models/team-a/Llama-3.3-70B-Instruct,target=/models/team-a/Llama-3.3-70B-Instruct,readonly"
        in line
    )
    assert "--health-cmd 'curl -fsS http://127.0.0.1:8000/health'" in line
    assert line.startswith("docker run --detach --name berth-12-g3 --init ")
    assert line.endswith(" --max-model-len 8192 --gpu-memory-utilization 0.9")


def test_the_run_line_says_exactly_what_the_kwargs_say() -> None:
    """Parse the line back as a shell would and compare every value with the kwargs."""
    kwargs = container_kwargs(SPEC)
    argv = shlex.split(docker_run_line(kwargs))
    assert argv == docker_run_argv(kwargs)
    image_at = argv.index(kwargs["image"])
    assert argv[image_at + 1 :] == kwargs["command"]
    flags = _flag_values(argv[:image_at])
    assert flags["--gpus"] == ['"device=GPU-4,GPU-5,GPU-6,GPU-7"']
    assert dict(value.split("=", 1) for value in flags["--env"]) == kwargs["environment"]
    assert dict(value.split("=", 1) for value in flags["--label"]) == kwargs["labels"]
    assert flags["--publish"] == ["127.0.0.1:30012:8000"]
    assert flags["--shm-size"] == [str(kwargs["shm_size"])]
    assert flags["--health-start-period"] == ["900s"]
    assert flags["--restart"] == ["on-failure:2"]


def test_no_gpus_means_no_device_request() -> None:
    spec = LaunchSpec(**{**SPEC.__dict__, "gpu_device_ids": ()})
    assert "device_requests" not in container_kwargs(spec)
    assert "--gpus" not in docker_run_argv(container_kwargs(spec))


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    index = 2
    while index < len(argv):
        flag = argv[index]
        if "=" in flag or flag in {"--detach", "--init"}:
            index += 1
            continue
        values.setdefault(flag, []).append(argv[index + 1])
        index += 2
    return values


@pytest.mark.docker
def test_the_real_engine_accepts_the_template_and_refuses_gpus_it_cannot_give(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    import docker

    deployment = 900_000 + uuid.uuid4().int % 99_999
    spec = LaunchSpec(
        **{
            **SPEC.__dict__,
            "deployment_id": deployment,
            "image": busybox_image,
            "gpu_device_ids": (),
            "model_host_path": str(tmp_path),
            "host_port": 0,
            "health_command": ("true",),
        }
    )
    kwargs = container_kwargs(spec)
    kwargs["command"] = [
        "sh",
        "-c",
        "touch /berth-cache/ok && ! touch /models/team-a/Llama-3.3-70B-Instruct/x",
    ]
    container = docker_client.containers.create(**kwargs)
    try:
        container.start()
        assert container.wait(timeout=30)["StatusCode"] == 0  # cache writable, model read-only
        host = container.attrs["HostConfig"]
        assert (host["CapDrop"], host["SecurityOpt"], host["PidsLimit"], host["Init"]) == (
            ["ALL"],
            ["no-new-privileges:true"],
            4096,
            True,
        )
        assert host["Privileged"] is False
        assert host["NetworkMode"] != "host"
        assert container.attrs["Config"]["Labels"]["berth.deployment"] == str(deployment)
    finally:
        container.remove(force=True)
        docker_client.volumes.get(spec.cache_volume).remove(force=True)

    gpu_kwargs = container_kwargs(LaunchSpec(**{**spec.__dict__, "gpu_device_ids": ("0",)}))
    gpu_kwargs["command"] = ["true"]
    gpu_container = docker_client.containers.create(**gpu_kwargs)
    try:
        with pytest.raises(
            docker.errors.APIError,
            match=r'could not select device driver "" with capabilities: \[\[gpu\]\]',
        ):
            gpu_container.start()
    finally:
        gpu_container.remove(force=True)
        docker_client.volumes.get(spec.cache_volume).remove(force=True)


def test_gpus_4_and_5_read_exactly_like_the_field_report() -> None:
    spec = LaunchSpec(**{**SPEC.__dict__, "gpu_device_ids": ("4", "5")})
    assert " --gpus '\"device=4,5\"' " in docker_run_line(container_kwargs(spec))
