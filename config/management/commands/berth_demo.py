"""``manage.py berth_demo``: make this console ready for a first deployment (opt-in, idempotent).

For evaluating Berth on a laptop with Docker and no GPU (``make run BERTH_DEMO=1`` runs it
after migrating). It registers this machine as a host with its local Docker engine, creates a
demo storage mount under ``var/demo/models`` holding a tiny servable model (random weights, a
BPE tokenizer, a chat template), a demo team with one member, and allow-lists an engine:

* the real one (``config.demo_engine``: vLLM for CPUs, the image ``build_engine_image
  vllm-cpu`` makes) when its image is here or can be built; the demo then also registers the
  model and deploys it, and ``make run`` sends it a first chat completion;
* else, or with ``BERTH_DEMO_ENGINE=stand-in``, the **stand-in engine** (``docker/test-engine/``:
  answers like vLLM, runs no model, is NOT vLLM), for the walkthrough by hand.

Running it again changes nothing that is already there; every change is audited.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

import audit
from accounts.models import Role, Team, User
from accounts.services import GENERATED_PASSWORD_BYTES, add_member, create_team, create_user
from audit.actions import Action
from config.demo_engine import choose_engine, deploy_demo_model
from deployments.models import EngineImage
from deployments.runtime.engine_images import save_cpu_engine
from deployments.runtime.stand_in import (
    StandInUnavailable,
    build_engine_image,
    engine_health_command,
)
from gpus.collectors import docker_client
from gpus.hosts import local_host_name, register_host
from gpus.models import Host
from models_registry.models import StorageMount
from models_registry.tiny_model import write_servable_model

TEAM_SLUG = "demo"
MEMBER = "demo"
MOUNT_NAME = "demo"
MOUNT_PREFIX = "/demo/models"
MODEL_NAME = "tiny-llama"
IMAGE_NAME = "stand-in"
# Long enough to watch "loading" on the page, short enough for a demo.
STAND_IN_LOAD_SECONDS = "4"
INSTALL_DOCKER = (
    "install Docker Engine (Debian/Ubuntu: sudo apt-get install docker.io; elsewhere "
    "https://docs.docker.com/engine/install/) and let this user reach it "
    "(sudo usermod -aG docker $USER, then sign in again), or point DOCKER_HOST at an engine"
)


@dataclass
class DemoReport:
    """What the run found or did, one line per item, and the demo member's new password."""

    lines: list[str] = field(default_factory=list)
    password: str | None = None
    host: str = ""
    model_path: str = ""


class Command(BaseCommand):
    help = (
        "Prepare a demo: local host, the real CPU engine (or the stand-in), demo model, team and "
        "member; on the real engine it also deploys the model."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--password",
            default=None,
            help="the demo member's password when the account is created (default: generated "
            "and printed once)",
        )

    def handle(self, *args: Any, password: str | None, **options: Any) -> None:
        report = DemoReport()
        engine = choose_engine(report.lines.append)
        image = ensure_stand_in_image(report, required=engine == "stand-in")
        host = ensure_local_host(report)
        team = ensure_team(report)
        member = ensure_member(report, team, password)
        ensure_model_directory(report, ensure_mount(report))
        page = ""
        if engine == "vllm":
            line, page = deploy_demo_model(member, team, host, report.model_path)
            report.lines.append(line)
        for line in report.lines:
            self.stdout.write(f"  {line}")
        self.stdout.write(self.style.SUCCESS("The demo is ready."))
        if engine == "vllm":
            self._real_engine_steps(report, page)
        else:
            self._next_steps(report, host, image)

    def _real_engine_steps(self, report: DemoReport, page: str) -> None:
        url = f"http://{settings.BERTH_BIND}:{settings.BERTH_PORT}"
        login = f"{MEMBER} / {report.password}" if report.password else MEMBER
        self.stdout.write(
            f"The demo model is deploying on the real engine (vLLM for CPUs). At {url}{page} "
            f"(make run), signed in as {login}, its page goes queued → launching → loading → "
            "ready with the engine's own milestones; make run then sends it a first chat "
            "completion. Its weights are random, so its text is random too.\n"
            "For the stand-in engine instead (fast, NOT vLLM): BERTH_DEMO_ENGINE=stand-in."
        )

    def _next_steps(self, report: DemoReport, host: Host, image: EngineImage) -> None:
        url = f"http://{settings.BERTH_BIND}:{settings.BERTH_PORT}/"
        login = f"{MEMBER} / {report.password}" if report.password else MEMBER
        self.stdout.write(
            f"Next, at {url} (make run), signed in as {login}:\n"
            f"  1. Models → Register a model → path {report.model_path}\n"
            f"  2. Deployments → Deploy a model → that model, host {host.name}, "
            f"image {image.name}, GPUs 0\n"
            "  The page goes queued → launching → loading → ready and shows the docker run line.\n"
            f"Note: '{image.name}' is Berth's stand-in engine, NOT vLLM: it answers like vLLM "
            "and runs no model. On a GPU host, an admin allow-lists vllm/vllm-openai "
            "(Admin → Engine images)."
        )
        if report.password is None:
            self.stdout.write(
                f"  (the {MEMBER} account existed: its password is unchanged; "
                f"reset it with manage.py changepassword {MEMBER})"
            )


def ensure_stand_in_image(report: DemoReport, *, required: bool = True) -> EngineImage | None:
    """Build the stand-in image on the local engine when missing and allow-list it (CPU). Not
    ``required`` (the demo runs the real engine), a machine without busybox skips it."""
    try:
        client = docker_client()
        client.ping()
    except Exception as exc:  # docker raises several unrelated types when there is no engine
        raise CommandError(f"Docker is not reachable ({exc}). Fix: {INSTALL_DOCKER}.") from None
    try:
        tag = build_engine_image(client)
    except StandInUnavailable as exc:
        if not required:
            report.lines.append(f"stand-in engine: skipped ({exc})")
            return None
        raise CommandError(f"cannot build the stand-in engine image: {exc}") from None
    finally:
        client.close()
    wanted = {
        "reference": tag,
        "description": "Berth's stand-in engine, NOT vLLM: answers like vLLM, runs no model",
        "gpu_capable": False,
        "cpu_capable": True,
        "is_stand_in": True,
        "health_command": engine_health_command(),
        "environment": {"ENGINE_LOAD_SECONDS": STAND_IN_LOAD_SECONDS},
        "enabled": True,
    }
    created = save_cpu_engine(
        IMAGE_NAME,
        wanted,
        current=lambda image: image.reference == tag and image.is_stand_in and image.enabled,
    )
    image = EngineImage.objects.get(name=IMAGE_NAME)
    if created is None:
        report.lines.append(f"engine image '{IMAGE_NAME}' ({tag}): already allow-listed")
        return image
    verb = "allow-listed" if created else "updated to the current build"
    report.lines.append(f"engine image '{IMAGE_NAME}' ({tag}): {verb} (CPU, stand-in)")
    return image


def ensure_local_host(report: DemoReport) -> Host:
    """This machine as a host on its local Docker engine (kept as it is when registered)."""
    name = local_host_name()
    host = Host.objects.filter(name=name).first()
    if host is not None:
        report.lines.append(f"host '{name}': already registered")
    else:
        host, _ = register_host(name)
        report.lines.append(f"host '{name}': registered (local Docker engine, queue host:{name})")
    report.host = name
    return host


def ensure_team(report: DemoReport) -> Team:
    team = Team.objects.filter(slug=TEAM_SLUG).first()
    if team is not None:
        report.lines.append(f"team '{TEAM_SLUG}': already there")
        return team
    report.lines.append(f"team '{TEAM_SLUG}': created")
    return create_team(TEAM_SLUG, "Demo team", "Created by manage.py berth_demo")


def ensure_member(report: DemoReport, team: Team, password: str | None) -> User:
    user = User.objects.filter(username=MEMBER).first()
    if user is None:
        chosen = password or secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        user = create_user(MEMBER, chosen, Role.MEMBER)
        report.password = chosen
        report.lines.append(f"member '{MEMBER}': created")
    else:
        report.lines.append(f"member '{MEMBER}': already there")
    add_member(team, user)
    return user


def ensure_mount(report: DemoReport) -> StorageMount:
    """A storage mount over ``var/demo/models``: one folder per team, read by this machine and
    by its Docker engine at the same path."""
    root = (Path(settings.VAR_DIR) / "demo" / "models").resolve()
    root.mkdir(parents=True, exist_ok=True)
    wanted = {
        "canonical_prefix": MOUNT_PREFIX,
        "local_path": str(root),
        "host_path": str(root),
        "container_path": "/models",
    }
    with transaction.atomic():
        mount = StorageMount.objects.select_for_update().filter(name=MOUNT_NAME).first()
        created = mount is None
        if mount is not None and all(getattr(mount, k) == v for k, v in wanted.items()):
            report.lines.append(f"storage mount '{MOUNT_NAME}' ({MOUNT_PREFIX}): already there")
            return mount
        mount = mount or StorageMount(name=MOUNT_NAME)
        for key, value in wanted.items():
            setattr(mount, key, value)
        try:
            mount.save()
        except ValidationError as exc:
            raise CommandError(f"cannot create the demo storage mount: {exc}") from None
        audit.record(Action.STORAGE_MOUNT_SAVED, target=mount, created=created, **wanted)
    report.lines.append(f"storage mount '{MOUNT_NAME}' ({MOUNT_PREFIX} → {root}): saved")
    return mount


def ensure_model_directory(report: DemoReport, mount: StorageMount) -> Path:
    """The tiny model, written once (rewriting would make a sync see a changed model)."""
    directory = Path(mount.local_path) / TEAM_SLUG / MODEL_NAME
    report.model_path = f"{MOUNT_PREFIX}/{TEAM_SLUG}/{MODEL_NAME}"
    if (directory / "config.json").is_file():
        report.lines.append(f"model directory {directory}: already there")
    else:
        write_servable_model(directory)
        report.lines.append(
            f"model directory {directory}: written (tiny Llama: random weights, a BPE tokenizer, "
            "a chat template)"
        )
    return directory
