"""The demo on the real engine: ``manage.py berth_demo`` builds (or finds) the CPU vLLM image,
allow-lists it, registers the demo model and requests its deployment as the demo member; then
``manage.py berth_up`` waits for it to be ready and sends it a first chat completion::

    engine = choose_engine(lines.append)   # "vllm" or "stand-in" (BERTH_DEMO_ENGINE)
    deploy_demo_model(member, team, host, model_path)
    first_chat(deployment)                 # "the demo model answered: …"

The model's weights are random, so what it writes is random too; the point is that every step
on the way (tokenizer, engine, Berth's launch, watch and endpoint) is real.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.utils import timezone

import docker
from accounts.keys import KeySettings, authenticate, create_api_key, revoke_api_key
from accounts.models import ApiKey, KeyScope
from deployments.models import Deployment, EngineImage
from deployments.runtime.engine_build import (
    API_TIMEOUT_S,
    EngineBuildError,
    Sources,
    build,
    existing_image,
    image_reference,
    load_recipe,
)
from deployments.runtime.engine_images import allow_list_cpu_engine
from deployments.services import DeployRequest, request_deployment
from deployments.states import ACTIVE, State
from gpus.host_resources import read_host_resources
from gpus.inventory import heartbeat
from models_registry import services as registry
from models_registry.models import Model

RECIPE = "vllm-cpu"
IMAGE_NAME = "vllm-cpu"
DEPLOYMENT_NAME = "tiny-chat"
CHAT_TOKENS = 16
READY_DEADLINE_S = 900  # a first start compiles the model: about a minute on 2 idle cores
POLL_S = 2.0
KEY_PROPAGATION_TRIES = 30
DEMO_KEY_NAME = "demo first chat"
DEMO_KEY_FILE = "demo-gateway-key"  # under VAR_DIR, mode 0600
DEMO_KEY_MIN_LEFT = timedelta(hours=1)  # a key about to expire is replaced, not reused


def choose_engine(say: Callable[[str], None]) -> str:
    """``vllm`` when the real engine's image is present or can be built here, else
    ``stand-in``; BERTH_DEMO_ENGINE=stand-in or =vllm decides instead (=vllm fails when the
    image cannot be had)."""
    wanted = settings.BERTH_DEMO_ENGINE
    if wanted == "stand-in":
        return "stand-in"
    try:
        ensure_engine_image(say)
    except EngineBuildError as exc:
        if wanted == "vllm":
            raise CommandError(
                f"BERTH_DEMO_ENGINE=vllm but the real engine cannot be built: {exc}"
            ) from None
        say(f"real engine: not available here ({str(exc).splitlines()[0]}); using the stand-in")
        return "stand-in"
    return "vllm"


def ensure_engine_image(say: Callable[[str], None]) -> EngineImage:
    """Build the CPU engine image unless present (minutes, once per machine), allow-list it."""
    recipe = load_recipe(RECIPE)
    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # docker raises several unrelated types when there is no engine
        raise EngineBuildError(f"Docker is not reachable ({exc})") from None
    try:
        if existing_image(client, image_reference(recipe)) is None:
            say(f"building the real engine image {image_reference(recipe)} (a few minutes, once)")
        result = build(recipe, client, _sources(), progress=lambda line: None)
    finally:
        client.close()
    say(allow_list_cpu_engine(IMAGE_NAME, result.image, result.engine_version))
    return EngineImage.objects.get(name=IMAGE_NAME)


def _sources() -> Sources:
    return Sources(
        debian_mirror=settings.BERTH_ENGINE_DEBIAN_MIRROR,
        pip_index_url=settings.BERTH_ENGINE_PIP_INDEX_URL,
        torch_index_url=settings.BERTH_ENGINE_TORCH_INDEX_URL,
        wheelhouse=Path(settings.BERTH_ENGINE_WHEELHOUSE),
    )


def deploy_demo_model(member: Any, team: Any, host: Any, model_path: str) -> tuple[str, str]:
    """Register the demo model and request its deployment on the real engine, unless one is
    active already; returns (line for the report, the deployment's page path)."""
    heartbeat(host, resources=read_host_resources())  # this machine is the demo's host
    host.refresh_from_db()
    model = Model.objects.filter(path=model_path).first()
    if model is None:
        model = registry.register(member, team, model_path)
    active = Deployment.objects.filter(team=team, name=DEPLOYMENT_NAME, state__in=ACTIVE).first()
    if active is not None:
        return f"deployment '{DEPLOYMENT_NAME}': already {active.state}", _page(active)
    request = DeployRequest(
        team=team,
        model=model,
        host=host,
        image=EngineImage.objects.get(name=IMAGE_NAME),
        name=DEPLOYMENT_NAME,
        gpu_count=0,
        engine_args={"max_model_len": 2048},
    )
    try:
        deployment = request_deployment(member, request)
    except ValidationError as exc:
        raise CommandError(f"cannot deploy the demo model: {exc}") from None
    return (
        f"deployment '{DEPLOYMENT_NAME}': requested on the real engine (vLLM for CPUs); host "
        f"'{host.name}' starts it as soon as its agent runs",
        _page(deployment),
    )


def _page(deployment: Deployment) -> str:
    return f"/deployments/{deployment.public_id}/"


def wait_until_served(deadline_s: float = READY_DEADLINE_S) -> Deployment | None:
    """The demo deployment once it is ready; None when it failed or the deadline passed."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        deployment = Deployment.objects.filter(name=DEPLOYMENT_NAME).order_by("-created").first()
        if deployment is None or deployment.state in (State.FAILED, State.STOPPED):
            return None
        if deployment.state == State.READY:
            return deployment
        time.sleep(POLL_S)
    return None


def _post_gateway(body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    gateway = urlsplit(settings.BERTH_GATEWAY_URL)
    connection = http.client.HTTPConnection(gateway.hostname, gateway.port or 80, timeout=120)
    try:
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )  # fmt: skip
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def demo_key(deployment: Deployment) -> tuple[ApiKey, str, bool]:
    """The demo team's gateway key for ``deployment`` and its clear text, and whether it was
    reused: the key kept in :func:`demo_key_file` while it still works for at least
    :data:`DEMO_KEY_MIN_LEFT` (so a curl line copied from the last ``make run`` keeps working);
    otherwise a new one (a day), written there (0600), every older demo key of the team revoked
    so that they do not pile up. A file other users could read is not trusted."""
    path = demo_key_file()
    kept = _read_private(path)
    key = authenticate(kept, KeyScope.INFERENCE) if kept else None
    if (
        key is not None
        and key.team_id == deployment.team_id
        and key.name == DEMO_KEY_NAME
        and deployment.name in key.model_names
        and key.expires is not None
        and key.expires - timezone.now() >= DEMO_KEY_MIN_LEFT
    ):
        return key, kept, True
    for old in ApiKey.objects.usable().filter(team=deployment.team, name=DEMO_KEY_NAME):
        revoke_api_key(old, reason="replaced by the next demo key")
    key, clear = create_api_key(
        deployment.team,
        KeySettings(name=DEMO_KEY_NAME, model_names=(deployment.name,), expires_days=1),
        created_by=deployment.requested_by,
    )
    _write_private(path, clear)
    return key, clear, False


def demo_key_file() -> Path:
    return Path(settings.VAR_DIR) / DEMO_KEY_FILE


def _read_private(path: Path) -> str:
    """The file's text when only its owner (this user) can read or write it, else ""."""
    try:
        with path.open(encoding="ascii") as handle:
            stat = os.fstat(handle.fileno())
            if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
                return ""
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, created 0600 (never readable by others, not even for a
    moment), by a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text + "\n")
    partial.replace(path)


def first_chat(deployment: Deployment) -> str:
    """One chat completion through the gateway with the demo team's key (:func:`demo_key`); the
    answer and how to send the next one."""
    key, clear, reused = demo_key(deployment)
    body = {
        "model": deployment.name,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": CHAT_TOKENS,
        "min_tokens": CHAT_TOKENS,  # random weights might otherwise stop at once
    }
    status, answer = 0, {}
    for _attempt in range(KEY_PROPAGATION_TRIES):
        status, answer = _post_gateway(body, clear)
        if status != HTTPStatus.UNAUTHORIZED:
            break
        time.sleep(1)  # the gateway learns of a new key over pub/sub, moments after it is made
    if status != HTTPStatus.OK:
        return f"The gateway answered {status}: {answer}"
    text = answer["choices"][0]["message"]["content"]
    tokens = answer["usage"]["completion_tokens"]
    url = f"{settings.BERTH_GATEWAY_URL.rstrip('/')}/v1/chat/completions"
    curl = (
        f"curl {url} -H 'Authorization: Bearer {clear}' -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{deployment.name}", "messages": [{{"role": "user", '
        f'"content": "Hello!"}}], "max_tokens": 16}}\''
    )
    return (
        f"The demo model answered through Berth's gateway ({tokens} tokens; random text, its "
        f"weights are random): {text!r}\n"
        f"  The demo team's key '{key.name}' ({'the same as last time' if reused else 'new'}; "
        f"expires {key.expires:%Y-%m-%d %H:%M} UTC; kept for the next run in "
        f"{demo_key_file()}, readable only by you): {clear}\n"
        f"  Try it yourself: {curl}"
    )
