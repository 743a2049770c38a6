"""The console served over ASGI, as ``make run`` serves it, for browser tests of live pages.

pytest-django's live server is WSGI, where the deployment page's status stream cannot run; these
fixtures start uvicorn in a child process on this test's database and Redis (the test must use
``django_db(transaction=True)`` so the child sees its rows), and open Chromium pages on it,
signed in through a real session.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from tests.conftest import BASE_DIR, screenshot, subprocess_env
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


@pytest.fixture
def asgi_url(transactional_db: None) -> Iterator[str]:
    """The base URL of the console under uvicorn (the status stream needs ASGI)."""
    port = free_port()
    web = [
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--lifespan", "off", "--no-access-log",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(web):
        wait_until(lambda: answers(f"{url}/healthz"), timeout=60, what="the ASGI console")
        yield url


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
