"""Finding 1 of the attack on a running console (issue 15): a cross-team model mount through a
directory swapped for a link between the launch's check and Docker's mount. Real Docker, the
stand-in engine (not vLLM)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accounts.models import Team
from audit.models import AuditEvent
from deployments.models import Deployment, EngineImage
from deployments.runtime import launcher, model_source
from deployments.states import State
from tests.deployment_builders import host_with_gpus, on_host, registered_model, remove_engines
from tests.model_dirs import LLAMA_CONFIG, write_model

pytestmark = [pytest.mark.docker, pytest.mark.django_db]
RACE_SECONDS = 60
SECRET = "SecretForCausalLM"


@pytest.fixture
def storage(tmp_path: Path, team_a: Team, team_b: Team) -> dict[str, Path]:
    """One mount, a folder per team: team A's ``box/llama`` (a real directory) and team B's
    secret model at ``team-b/llama`` — so ``team-a/box`` swapped for a link to ``../team-b``
    leads the same path to team B's weights."""
    root = tmp_path / "store"
    write_model(root / "team-a" / "box" / "llama")
    write_model(root / "team-b" / "llama")
    secret = {**LLAMA_CONFIG, "architectures": [SECRET]}
    (root / "team-b" / "llama" / "config.json").write_text(json.dumps(secret))
    return {"root": root, "box": root / "team-a" / "box", "secret": root / "team-b" / "llama"}


@pytest.fixture
def deployments(
    storage: dict[str, Path], team_a: Team, engine_image: str, docker_client: Any
) -> Iterator[Any]:
    """Makes team A's queued deployments of ``box/llama`` on the stand-in; removes their
    containers after."""
    model = registered_model(team_a, storage["root"], "box/llama")
    host = host_with_gpus(count=1)
    image = EngineImage.objects.create(
        name="stand-in",
        reference=engine_image,
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
        environment={"ENGINE_LOAD_SECONDS": "60"},
    )
    made: list[Deployment] = []

    def make(name: str) -> Deployment:
        made.append(
            Deployment.objects.create(
                name=name, team=team_a, model=model, host=host, image=image, gpu_count=0,
                state=State.QUEUED,
            )
        )  # fmt: skip
        return made[-1]

    yield make
    remove_engines(docker_client, made)


def _swap_to_team_b(box: Path) -> None:
    box.rename(box.with_name("box-real"))
    box.symlink_to(Path("..", "team-b"))


def _swap_back(box: Path) -> None:
    if box.is_symlink():
        box.unlink()
        box.with_name("box-real").rename(box)


def _architecture_inside(docker_client: Any, deployment: Deployment) -> str:
    """The architecture the engine's container reads from its mounted model. An exec on a busy
    engine now and then returns exit 0 with its output lost (seen in CI on 2 cores), so an empty
    answer is asked again, up to a deadline, rather than read as JSON."""
    container = docker_client.containers.get(deployment.container_name)
    deadline = time.monotonic() + 10
    while True:
        result = container.exec_run(["cat", "/models/team-a/box/llama/config.json"])
        if result.exit_code != 0:
            return ""
        if result.output.strip():
            return json.loads(result.output)["architectures"][0]
        assert time.monotonic() < deadline, "the container never answered with its config.json"


def test_finding_01_a_swap_between_the_check_and_the_create_is_refused(
    storage: dict[str, Path], deployments: Any, docker_client: Any
) -> None:
    deployment = deployments("swapped")
    swapped: list[model_source.ModelSource] = []

    def swap(_deployment: Any, source: model_source.ModelSource) -> None:
        swapped.append(source)
        _swap_to_team_b(storage["box"])

    model_source.BETWEEN_CHECK_AND_CREATE.append(swap)
    try:
        result = on_host(launcher.launch, deployment, 1)
    finally:
        model_source.BETWEEN_CHECK_AND_CREATE.remove(swap)
        _swap_back(storage["box"])
    deployment.refresh_from_db()
    assert swapped, "the hook ran"
    assert deployment.state == State.FAILED, result
    assert deployment.diagnosis[0]["code"] == "path-changed"
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )
    event = AuditEvent.objects.get(action="deployment.path_changed", outcome="denied")
    secret = os.stat(storage["secret"])
    assert event.payload["checked"] == swapped[0].identity
    assert event.payload["mounted"] == f"{secret.st_dev}:{secret.st_ino}"  # it was team B's
    assert event.payload["source"].endswith("/team-a/box/llama")


def test_finding_01_a_link_below_the_team_folder_is_refused_before_anything_is_created(
    storage: dict[str, Path], deployments: Any, docker_client: Any
) -> None:
    _swap_to_team_b(storage["box"])
    try:
        deployment = deployments("linked")
        on_host(launcher.launch, deployment, 1)
    finally:
        _swap_back(storage["box"])
    deployment.refresh_from_db()
    assert deployment.state == State.FAILED
    assert "symbolic link" in deployment.last_error
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )


def test_finding_01_a_free_running_swap_race_never_mounts_another_teams_model(
    storage: dict[str, Path], deployments: Any, docker_client: Any
) -> None:
    """The attack as it ran: the directory flips between team A's and a link to team B's every
    few milliseconds while launches run, for a minute. Every engine that came up is asked
    which model it sees: never team B's."""
    stop = threading.Event()
    flips = Counter()

    def swapper() -> None:
        while not stop.is_set():
            _swap_to_team_b(storage["box"])
            time.sleep(0.002)
            _swap_back(storage["box"])
            flips["flips"] += 1
            time.sleep(0.003)

    thread = threading.Thread(target=swapper, daemon=True)
    outcomes = Counter()
    escapes = []
    thread.start()
    deadline = time.monotonic() + RACE_SECONDS
    try:
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            deployment = deployments(f"race-{attempt}")
            on_host(launcher.launch, deployment, 1)
            deployment.refresh_from_db()
            if deployment.state == State.LOADING:
                outcomes["mounted"] += 1
                if _architecture_inside(docker_client, deployment) == SECRET:
                    escapes.append(deployment.name)
                docker_client.containers.get(deployment.container_name).remove(force=True)
            else:
                outcomes[(deployment.diagnosis or [{"code": "?"}])[0]["code"]] += 1
            Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert escapes == [], (escapes, outcomes)
    assert outcomes["mounted"] > 0, outcomes  # the race let launches through, and checked them
    assert flips["flips"] > 1000
