"""``manage.py berth_demo``: a console ready for a first deployment, idempotent, audited, and
clear about what to install when Docker or busybox is missing."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import Role, User
from audit.models import AuditEvent
from deployments.models import EngineImage
from deployments.runtime import stand_in
from gpus.hosts import local_host_name
from gpus.models import Host
from models_registry.inspection import inspect_directory
from models_registry.models import StorageMount
from tests.conftest import TEST_INSTANCE, clean_environ, which_or_skip

pytestmark = [pytest.mark.docker, pytest.mark.django_db]


def run_demo(**options: Any) -> str:
    out = io.StringIO()
    call_command("berth_demo", stdout=out, **options)
    return out.getvalue()


@pytest.fixture
def var_dir(settings: Any, tmp_path: Path) -> Path:
    """A fresh ``var/`` for the demo's model directory; the stand-in engine (the real one has
    tests of its own, marked vllm)."""
    settings.VAR_DIR = tmp_path / "var"
    settings.BERTH_DEMO_ENGINE = "stand-in"
    return settings.VAR_DIR


def test_demo_prepares_everything_a_first_deployment_needs(
    var_dir: Path, engine_image: str
) -> None:
    output = run_demo(password="demo-password-1234")

    image = EngineImage.objects.get(name="stand-in")
    assert (image.reference, image.is_stand_in, image.cpu_capable, image.gpu_capable) == (
        engine_image,
        True,
        True,
        False,
    )
    assert image.health_command[0] == "curl"
    assert Host.objects.filter(name=local_host_name(), docker_endpoint="").exists()
    member = User.objects.get(username="demo")
    assert member.role == Role.MEMBER
    assert member.check_password("demo-password-1234")
    assert list(member.teams.values_list("slug", flat=True)) == ["demo"]
    mount = StorageMount.objects.get(name="demo")
    assert mount.local_path == str((var_dir / "demo" / "models").resolve())
    model_dir = Path(mount.local_path) / "demo" / "tiny-llama"
    report = inspect_directory(model_dir, storage_root=Path(mount.local_path))
    assert [f.code for f in report.findings if f.severity == "error"] == []
    assert report.architecture == "LlamaForCausalLM"
    assert "/demo/models/demo/tiny-llama" in output
    assert "NOT vLLM" in output
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {
        "image.saved",
        "host.registered",
        "team.created",
        "account.created",
        "team.member_added",
        "storage.mount_saved",
    } <= actions


def test_a_second_run_changes_nothing(var_dir: Path, engine_image: str) -> None:
    run_demo()
    events = AuditEvent.objects.count()
    model_config = var_dir / "demo" / "models" / "demo" / "tiny-llama" / "config.json"
    written = model_config.stat().st_mtime_ns

    output = run_demo()

    assert AuditEvent.objects.count() == events
    assert model_config.stat().st_mtime_ns == written
    assert output.count("already") == 6
    assert "password is unchanged" in output


def test_a_stale_stand_in_reference_is_updated(var_dir: Path, engine_image: str) -> None:
    EngineImage.objects.create(
        name="stand-in", reference="berth-test/engine:000000000000", cpu_capable=True
    )
    run_demo()
    assert EngineImage.objects.get(name="stand-in").reference == engine_image


def test_without_docker_it_says_what_to_install(var_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(CommandError, match=r"Docker is not reachable .*apt-get install docker"):
        run_demo()
    assert not EngineImage.objects.exists()


def test_without_busybox_it_says_what_to_install(var_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(stand_in, "BUSYBOX", var_dir / "no-busybox")
    with pytest.raises(CommandError, match="apt-get install busybox-static"):
        run_demo()


@pytest.mark.redis
def test_make_run_with_the_demo_flag_serves_a_console_ready_for_the_journey(
    tmp_path: Path,
) -> None:
    """``BERTH_DEMO=1 make run`` on a fresh machine: demo first, then the agent of the demo host
    (it runs the launches) beside the worker and the web server."""
    from tests.test_run_command import Console, _free_port

    which_or_skip("redis-server")
    env = clean_environ("DATABASE_URL", "SECRET_KEY", "BERTH_ADMIN_PASSWORD")
    env.update(
        BERTH_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'berth.sqlite3'}",
        BERTH_PORT=str(_free_port()),
        REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0",
        BERTH_DEMO="1",
        BERTH_DEMO_ENGINE="stand-in",
        BERTH_LOCAL_HOST_NAME="demo-laptop",
        BERTH_INSTANCE=TEST_INSTANCE,
        PYTHONUNBUFFERED="1",
    )
    console = Console(env)
    try:
        console.wait_for("The demo is ready.", 90)
        console.wait_for("signed in as demo / ", 5)
        console.wait_for("Berth is up at", 90)
        agent = console.wait_for("agent pid", 5)
    finally:
        console.process.send_signal(signal.SIGINT)
        console.process.wait(timeout=40)
        output = console.rest()
        console.process.stdout.close()
    assert "queue 'host:demo-laptop'" in agent, output
    assert "engine image 'stand-in'" in output
    assert "Berth stopped." in output
    assert "No engine image is allow-listed" not in output  # the hint is for a plain make run
