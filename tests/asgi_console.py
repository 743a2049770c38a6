"""The console served over ASGI, as ``make run`` serves it, for browser tests of live pages.

pytest-django's live server is WSGI, where the deployment page's status stream cannot run; these
fixtures start uvicorn in a child process on this test's database and Redis (the test must use
``django_db(transaction=True)`` so the child sees its rows), and open Chromium pages on it,
signed in through a real session. ``demo_console`` prepares what ``manage.py berth_demo`` does
and ``console_url`` also runs the demo host's agent, which launches on the real Docker engine.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from django.conf import global_settings, settings
from django.core.management import call_command
from django.test import Client

from deployments.models import Deployment
from gpus.models import Host
from tests.conftest import BASE_DIR, PASSWORD, TEST_INSTANCE, screenshot, subprocess_env
from tests.engine_image import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(argv: list[str], **env: str) -> Iterator[subprocess.Popen]:
    """A child process on this test's database and Redis, terminated afterwards."""
    process = subprocess.Popen(
        argv,
        env=subprocess_env(**env),
        cwd=BASE_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def manage(*args: str) -> list[str]:
    return [sys.executable, str(BASE_DIR / "manage.py"), *args]


def _same_keys() -> dict[str, str]:
    """The child signs sessions with this process's key, so ``signed_in_page`` sessions hold
    (a test that moves ``VAR_DIR`` would otherwise give the child a newly generated one)."""
    return {"SECRET_KEY": settings.SECRET_KEY}


def _web() -> tuple[list[str], str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--lifespan", "off", "--no-access-log",
    ]  # fmt: skip
    return argv, f"http://127.0.0.1:{port}"


@pytest.fixture
def asgi_url(transactional_db: None) -> Iterator[str]:
    """The base URL of the console under uvicorn (the status stream needs ASGI)."""
    web, url = _web()
    with running(web, **_same_keys()):
        wait_until(lambda: answers(f"{url}/healthz"), timeout=60, what="the ASGI console")
        yield url


@pytest.fixture
def demo_console(settings: Any, tmp_path: Path, engine_image: str) -> Host:
    """The console after ``manage.py berth_demo`` (its var/ in tmp_path), demo member's
    password known."""
    settings.VAR_DIR = tmp_path / "var"
    # The console runs in another process with Django's default hashers (tests use MD5).
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    settings.BERTH_DEMO_ENGINE = "stand-in"  # the walkthrough by hand, on the fast engine
    call_command("berth_demo", password=PASSWORD, stdout=io.StringIO())
    return Host.objects.get()


@pytest.fixture
def console_url(demo_console: Host, docker_client: Any) -> Iterator[str]:
    """The console served over ASGI as ``make run`` serves it, and the demo host's agent. Both
    share this test's database and Redis."""
    web, url = _web()
    # The host's agent as make run starts it (worker on host:<name> with the scheduler, plus
    # the GPU collector); the nvidia-smi-in-a-container source is left out: it would pull an
    # image on a machine that has no GPU anyway.
    sources = "nvml,nvidia-smi-csv,nvidia-smi-xml"
    agent = manage("berth_agent", "--host", demo_console.name, "--sources", sources)
    try:
        with running(web, **_same_keys()), running(agent, BERTH_MONITOR_INTERVAL_S="0.5"):
            wait_until(lambda: answers(f"{url}/healthz"), timeout=60, what="the ASGI console")
            yield url
    finally:
        remove_engines(docker_client)


def remove_engines(client: Any) -> None:
    """Whatever the test left (a failure before Stop): its engines and their cache volumes."""
    for pk in Deployment.objects.values_list("pk", flat=True):
        labels = [f"berth.instance={TEST_INSTANCE}", f"berth.deployment={pk}"]
        for container in client.containers.list(all=True, filters={"label": labels}):
            container.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(f"{TEST_INSTANCE}-cache-{pk}").remove(force=True)


@contextmanager
def signed_in_page(
    browser: Any,
    url: str,
    user: Any,
    *,
    viewport: dict[str, int] | None = None,
    name: str = "asgi-page",
) -> Iterator[Any]:
    """A page on the console at ``url``, signed in as ``user`` with a real session (no login
    form: the child process hashes passwords slowly). Console errors fail the test; the last
    state is kept as a screenshot when the block raises."""
    client = Client()
    client.force_login(user)
    context = browser.new_context(base_url=url, viewport=viewport or {"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": url,
            }
        ]
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    except BaseException:
        screenshot(page, f"failed-{name}")
        raise
    finally:
        context.close()
    assert errors == [], f"browser console errors: {errors}"
