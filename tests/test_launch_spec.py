"""The container template: a golden set of Docker kwargs, the equivalent `docker run` line built
from the same kwargs, and the real engine accepting them (and refusing GPUs it cannot give)."""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from deployments.runtime.engine_args import SchemaError, parse_engine_args
from deployments.runtime.launch_spec import (
    LaunchSpec,
    container_kwargs,
    docker_run_argv,
    docker_run_line,
    engine_version,
    load_strategy,
)

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
            "TRITON_CACHE_DIR": "/berth-cache/triton", "TORCHINDUCTOR_CACHE_DIR": "/berth-cache/inductor",
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "VLLM_ENGINE_READY_TIMEOUT_S": "1200",
        },
        "mounts": [
            {"Target": "/models/team-a/Llama-3.3-70B-Instruct", "Source": "/mnt/ceph/models/team-a/Llama-3.3-70B-Instruct",
             "Type": "bind", "ReadOnly": True},
            {"Target": "/berth-cache", "Source": "berth-cache-12", "Type": "volume", "ReadOnly": False,
             "VolumeOptions": {"Labels": {"berth.managed": "true", "berth.instance": "berth",
                                          "berth.deployment": "12", "berth.team": "team-a"}}},
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
    cache_mount = next(value for value in flags["--mount"] if "type=volume" in value)
    assert cache_mount == (
        "type=volume,source=berth-cache-12,target=/berth-cache,volume-label=berth.managed=true,"
        "volume-label=berth.instance=berth,volume-label=berth.deployment=12,"
        "volume-label=berth.team=team-a"
    )
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
        # The cache volume is labelled too: an operator finds (and prunes) it by label.
        by_label = docker_client.volumes.list(
            filters={"label": [f"berth.instance={spec.instance}", f"berth.deployment={deployment}"]}
        )
        assert [volume.name for volume in by_label] == [spec.cache_volume]
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


# --- load strategy by storage kind ------------------------------------------------------------

STREAMER_16 = (
    "--load-format",
    "runai_streamer",
    "--model-loader-extra-config",
    '{"concurrency": 16}',
)
STREAMER_32 = (
    "--load-format",
    "runai_streamer",
    "--model-loader-extra-config",
    '{"concurrency": 32}',
)


@pytest.mark.parametrize(
    ("reference", "version"),
    [
        ("vllm/vllm-openai:v0.11.0", (0, 11)),
        ("vllm/vllm-openai:v0.33.0@sha256:" + "ab" * 32, (0, 33)),
        ("registry.local:5000/vllm/vllm-openai:0.18.1-cu129", (0, 18)),
        ("vllm/vllm-openai:latest", None),
        ("vllm/vllm-openai@sha256:" + "ab" * 32, None),
        ("registry.local:5000/vllm", None),
        ("berth-test/engine:3f9c2a", None),
    ],
)
def test_engine_version_comes_from_the_image_tag(
    reference: str, version: tuple[int, int] | None
) -> None:
    assert engine_version(reference) == version


@pytest.mark.parametrize(
    ("kind", "version", "tp", "argv"),
    [
        ("auto", (0, 33), 1, ()),
        ("local", (0, 33), 4, ()),
        ("network", (0, 33), 1, STREAMER_16),
        ("network", (0, 33), 4, ("--safetensors-load-strategy", "prefetch")),
        ("network", (0, 12), 4, ("--safetensors-load-strategy", "eager")),
        ("network", (0, 10), 1, ()),
        ("network", None, 1, ()),
        ("object", (0, 33), 8, STREAMER_32),
        ("object", (0, 10), 1, ()),
    ],
)
def test_the_load_strategy_follows_the_storage_kind_and_the_engine_version(
    kind: str, version: tuple[int, int] | None, tp: int, argv: tuple[str, ...]
) -> None:
    strategy = load_strategy(kind, version, tp)
    assert strategy.argv == argv
    assert strategy.reason


def test_load_flags_go_before_the_users_flags_and_users_cannot_set_them() -> None:
    spec = LaunchSpec(
        **{**SPEC.__dict__, "load_args": load_strategy("network", (0, 33), 4).argv,
           "engine_args": ("--enforce-eager",)}
    )  # fmt: skip
    assert container_kwargs(spec)["command"][-3:] == [
        "--safetensors-load-strategy", "prefetch", "--enforce-eager",
    ]  # fmt: skip
    for flag in ("load_format", "safetensors-load-strategy", "--model-loader-extra-config"):
        with pytest.raises(SchemaError, match=r"storage kind|loader.s settings") as refused:
            parse_engine_args({flag: "eager"})
        assert flag in refused.value.errors


@pytest.mark.django_db
def test_a_launch_on_network_storage_gets_the_load_flags(team_a: Any, tmp_path: Path) -> None:
    from deployments.runtime.launcher import build_spec
    from models_registry.models import StorageKind, StorageMount
    from tests.deployment_builders import deployment, host_with_gpus, registered_model

    model = registered_model(team_a, tmp_path)
    record = deployment(team_a, model, host_with_gpus(), gpu_count=2)  # image vLLM v0.11.0
    assert build_spec(record, [], 30000).load_args == ()  # kind not stated
    StorageMount.objects.update(kind=StorageKind.NETWORK)
    record.refresh_from_db()
    record.model.mount.refresh_from_db()
    assert build_spec(record, [], 30000).load_args == ("--safetensors-load-strategy", "eager")


@pytest.mark.docker
@pytest.mark.django_db
def test_the_cache_volume_survives_stop_and_restart_and_goes_with_delete(
    team_a: Any, tmp_path: Path, engine_image: str, docker_client: Any
) -> None:
    """vLLM's compile cache lives in the volume: a restarted generation finds what the last
    one wrote; only deleting the deployment removes it."""
    from deployments.models import Deployment, EngineImage
    from deployments.runtime import launcher
    from deployments.states import State
    from tests.deployment_builders import host_with_gpus, on_host, registered_model
    from tests.model_dirs import write_model

    write_model(tmp_path / "team-a" / "tiny")
    image = EngineImage.objects.create(
        name="stand-in", reference=engine_image, gpu_capable=False, cpu_capable=True,
        is_stand_in=True, environment={"ENGINE_LOAD_SECONDS": "30"},
    )  # fmt: skip
    record = Deployment.objects.create(
        name="tiny", team=team_a, model=registered_model(team_a, tmp_path, "tiny"),
        host=host_with_gpus(count=1), image=image, gpu_count=0, state=State.QUEUED,
        engine_args={"max_model_len": 2048},
    )  # fmt: skip
    volume = f"{settings.BERTH_INSTANCE}-cache-{record.pk}"

    def stop_generation(generation: int) -> None:
        Deployment.objects.filter(pk=record.pk).update(state=State.STOPPING)
        record.refresh_from_db()
        assert on_host(launcher.stop, record, generation) == "stopped"

    try:
        assert on_host(launcher.launch, record, 1) == "loading"
        first = docker_client.containers.get(record.container_name)
        write = ["sh", "-c", "mkdir -p /berth-cache/vllm && touch /berth-cache/vllm/compiled"]
        assert first.exec_run(write).exit_code == 0
        stop_generation(1)
        Deployment.objects.filter(pk=record.pk).update(
            generation=2, state=State.QUEUED, container_id=""
        )
        record.refresh_from_db()
        assert on_host(launcher.launch, record, 2) == "loading"
        second = docker_client.containers.get(record.container_name)
        assert second.name.endswith("-g2")
        assert second.exec_run(["ls", "/berth-cache/vllm/compiled"]).exit_code == 0
        stop_generation(2)
        assert on_host(launcher.delete, record, 2) == "deleted"
        assert volume not in [v.name for v in docker_client.volumes.list(filters={"name": volume})]
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"berth.deployment={record.pk}"}
        ):
            container.remove(force=True)
        for leftover in docker_client.volumes.list(filters={"name": volume}):
            leftover.remove(force=True)


def test_the_engine_key_reaches_the_engine_and_never_the_run_line() -> None:
    secret = "engine-secret-0123456789abcdef"
    kwargs = container_kwargs(LaunchSpec(**{**SPEC.__dict__, "engine_key": secret}))
    assert kwargs["environment"]["VLLM_API_KEY"] == secret
    assert secret not in " ".join(kwargs["command"])  # not on the host's process list
    line = docker_run_line(kwargs)
    assert secret not in line
    assert "--env VLLM_API_KEY " in line  # docker takes it from the caller's environment
    assert "VLLM_API_KEY" not in container_kwargs(SPEC)["environment"]
