"""The deploy form on a machine without GPUs (the demo's) and the planner made visible there: a
CPU image on a GPU-less host means 0 GPUs, the refusals name the fix that applies, the plan panel
shows what the model needs on one 24, 48 and 80 GiB card and, for the real CPU engine, its host
memory plan, a context longer than the model's is refused, and the utilization default is the
planner's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.models import Team, User
from config.templatetags.berth_format import gib
from deployments.models import Deployment, EngineImage
from deployments.planning import DEFAULT_GPU_MEMORY_UTILIZATION
from deployments.runtime import host_memory
from deployments.runtime.engine_args import parse_engine_args
from deployments.validation import cpu_plan_for
from gpus.host_resources import read_host_resources
from gpus.inventory import heartbeat
from gpus.models import Host, HostStatus
from tests.conftest import BASE_DIR
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import LLAMA_CONFIG, write_model

pytestmark = pytest.mark.django_db
LLAMA_70B = Path(__file__).parent / "fixtures" / "model_configs" / "llama-3.1-70b-instruct.json"


@pytest.fixture
def laptop(team_a: Team, tmp_path: Path) -> dict[str, Any]:
    """The demo's situation: a host without GPUs, a CPU-only stand-in image, a tiny model."""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    model.config = json.loads((tmp_path / "team-a" / "tiny" / "config.json").read_text())
    model.save()
    host = Host.objects.create(name="laptop")
    heartbeat(host, resources=read_host_resources())  # its agent reports the machine's memory
    return {
        "team": team_a,
        "model": model,
        "host": host,
        "cpu": EngineImage.objects.create(
            name="stand-in",
            reference="berth/stand-in:1",
            gpu_capable=False,
            cpu_capable=True,
            is_stand_in=True,
        ),
        "vllm-cpu": EngineImage.objects.create(
            name="vllm-cpu",
            reference="berth/vllm-cpu:0.32.0-test",
            gpu_capable=False,
            cpu_capable=True,
        ),
        "vllm": EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0"),
    }


def form(laptop: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = {
        "name": "tiny", "team": laptop["team"].pk, "model": laptop["model"].pk,
        "host": laptop["host"].pk, "image": laptop["cpu"].pk, "gpu_count": "",
        "max_model_len": "", "kv_cache_dtype": "auto", "dtype": "auto", "environment": "",
    }  # fmt: skip
    return {**data, **changes}


def client_for(person: User) -> Client:
    client = Client()
    client.force_login(person)
    return client


def test_on_a_host_without_gpus_a_cpu_image_means_0_gpus(
    alice: User, laptop: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    client = client_for(alice)
    page = client.get("/deployments/new/").content.decode()
    assert re.search(r'name="gpu_count" value="0"', page)  # no GPU anywhere: 0 by default
    preview = client.post("/deployments/new/plan/", form(laptop)).content.decode()
    assert "laptop has no GPUs, so GPUs is 0: a CPU engine" in preview
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/deployments/new/", form(laptop))  # GPUs left empty
    assert response.status_code == 302, response.content.decode()
    assert Deployment.objects.get().gpu_count == 0


@pytest.mark.parametrize(
    ("image", "gpus", "field", "message"),
    [
        ("cpu", "1", "gpu_count", "set GPUs to 0"),
        ("vllm", "", "host", "laptop reports no GPUs and vllm needs them: pick another host"),
    ],
)
def test_without_gpus_the_refusal_names_the_fix_for_this_image(
    alice: User, laptop: dict[str, Any], image: str, gpus: str, field: str, message: str
) -> None:
    data = form(laptop, image=laptop[image].pk, gpu_count=gpus)
    client = client_for(alice)
    assert message in client.post("/deployments/new/plan/", data).content.decode()
    response = client.post("/deployments/new/", data)
    assert message in " ".join(response.context["form"].errors[field])
    assert not Deployment.objects.exists()


def test_the_plan_panel_shows_the_needs_on_common_gpus_also_without_gpus(
    alice: User, laptop: dict[str, Any]
) -> None:
    html = client_for(alice).post("/deployments/new/plan/", form(laptop)).content.decode()
    lines = re.findall(r"<li><strong>1 \u00d7 (\d+) GiB</strong>: (.*?)</li>", html)
    assert [gib for gib, _ in lines] == ["24", "48", "80"]
    assert all("fits" in text and "does not fit" not in text for _, text in lines)
    context = LLAMA_CONFIG["max_position_embeddings"]
    assert f"context up to {context} tokens" in html


def test_a_70b_model_shows_what_it_would_need(alice: User, laptop: dict[str, Any]) -> None:
    model = laptop["model"]
    model.config = json.loads(LLAMA_70B.read_text())
    model.parameter_count = model.weights_bytes = None
    model.save()
    html = (
        client_for(alice)
        .post("/deployments/new/plan/", form(laptop, max_model_len="8192"))
        .content.decode()
    )
    lines = dict(re.findall(r"<li><strong>1 \u00d7 (\d+) GiB</strong>: (.*?)</li>", html))
    assert all("does not fit" in lines[gib] for gib in ("24", "48", "80"))
    assert "Use 8 GPUs of 24.0 GiB" in lines["24"]  # what would: more cards of that size


def test_a_context_longer_than_the_model_allows_is_refused_in_the_form(
    alice: User, laptop: dict[str, Any]
) -> None:
    limit = LLAMA_CONFIG["max_position_embeddings"]
    too_long = form(laptop, max_model_len=str(limit * 2))
    client = client_for(alice)
    response = client.post("/deployments/new/", too_long)
    error = " ".join(response.context["form"].errors["max_model_len"])
    assert f"longer than this model's maximum, {limit}" in error
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in error
    preview = client.post("/deployments/new/plan/", too_long).content.decode()
    assert f"longer than this model&#x27;s maximum, {limit}" in preview
    assert not Deployment.objects.exists()
    allowed = {**too_long, "environment": "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"}
    assert client.post("/deployments/new/", allowed).status_code == 302


def test_one_utilization_default_everywhere(alice: User, laptop: dict[str, Any]) -> None:
    assert DEFAULT_GPU_MEMORY_UTILIZATION == 0.92
    page = client_for(alice).get("/deployments/new/").content.decode()
    assert f"empty: {DEFAULT_GPU_MEMORY_UTILIZATION}, vLLM&#x27;s default" in page
    readme = (BASE_DIR / "README.md").read_text()
    assert f"`--gpu-memory-utilization` ({DEFAULT_GPU_MEMORY_UTILIZATION})" in readme
    assert "0.9," not in page
    host_with_gpus(name="gpu-01", count=1)  # a GPU somewhere: empty means the planner's choice
    assert (
        'name="gpu_count" value="0"'
        not in client_for(alice).get("/deployments/new/").content.decode()
    )


def test_a_real_cpu_engine_shows_its_host_memory_plan(alice: User, laptop: dict[str, Any]) -> None:
    """The plan panel of vLLM for CPUs: the container's memory limit and what it holds, the KV
    space, the context, and what the host still gives CPU deployments — less once another CPU
    deployment holds its share."""
    host, model = Host.objects.get(pk=laptop["host"].pk), laptop["model"]
    data = form(laptop, image=laptop["vllm-cpu"].pk, max_model_len="2048")
    client = client_for(alice)
    html = client.post("/deployments/new/plan/", data).content.decode()
    plan = cpu_plan_for(model, host, parse_engine_args({"max_model_len": 2048}))
    free = host_memory.free_bytes(host)
    assert plan.fits
    assert '<strong class="ok-note">Fits</strong>' in html
    assert f"limited to <strong>{gib(plan.memory_limit_bytes)}</strong> of host memory" in html
    assert f"KV cache of {plan.kv_cache_space_gib} GiB" in html
    assert "VLLM_CPU_KVCACHE_SPACE" in html
    assert "context 2048 tokens" in html
    assert f"free for CPU deployments: <strong>{gib(free)}</strong>" in html
    assert 'aria-label="laptop host memory plan"' in html

    assert client.post("/deployments/new/", data).status_code == 302  # holds its memory
    held = Deployment.objects.get().host_memory_bytes
    assert held == plan.memory_limit_bytes
    again = client.post("/deployments/new/plan/", {**data, "name": "tiny-2"}).content.decode()
    assert f"free for CPU deployments: <strong>{gib(free - held)}</strong>" in again
    assert f"({gib(held)} held by other deployments" in again


def test_the_cpu_plan_says_when_the_host_memory_is_unknown(
    alice: User, laptop: dict[str, Any]
) -> None:
    Host.objects.filter(pk=laptop["host"].pk).update(memory_total_bytes=None)
    data = form(laptop, image=laptop["vllm-cpu"].pk, max_model_len="2048")
    html = client_for(alice).post("/deployments/new/plan/", data).content.decode()
    assert "Does not fit" in html
    assert "laptop's memory is unknown: its agent has not reported yet" in html


def test_with_any_host_the_cpu_plan_is_shown_for_the_host_it_would_use(
    alice: User, laptop: dict[str, Any]
) -> None:
    Host.objects.filter(pk=laptop["host"].pk).update(status=HostStatus.ONLINE)  # placeable
    host = Host.objects.get(pk=laptop["host"].pk)
    data = form(laptop, host="", image=laptop["vllm-cpu"].pk, max_model_len="2048")
    html = client_for(alice).post("/deployments/new/plan/", data).content.decode()
    plan = cpu_plan_for(laptop["model"], host, parse_engine_args({"max_model_len": 2048}))
    limit = gib(plan.memory_limit_bytes)
    assert f'laptop</strong>: <span class="ok-note">fits</span> on its CPUs: {limit}' in html
    assert "The plan on laptop" in html
    assert f"limited to <strong>{limit}</strong> of host memory" in html
