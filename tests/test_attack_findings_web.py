"""Findings 7 and 8 of the attack on a running console (issue 15): the client address behind
uvicorn, and a live status stream after sign-out or team removal."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from axes.helpers import get_client_ip_address
from django.conf import settings
from django.db import connections
from django.test import AsyncClient, Client, RequestFactory

from accounts.models import Membership, Team, User
from audit.models import AuditEvent
from config.management.commands.berth_up import web_command
from core.middleware import client_ip_for
from deployments.changes import publish
from deployments.models import Deployment, EngineImage
from deployments.states import State
from deployments.web import stream
from tests.conftest import BASE_DIR, PASSWORD, subprocess_env
from tests.deployment_builders import host_with_gpus, registered_model

# --- 7. X-Forwarded-For -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.fixture
def uvicorn_as_berth_up_starts_it(transactional_db: None) -> Iterator[str]:
    """The web server exactly as ``berth_up`` starts it (its own argv), on this test's
    database; yields the base URL."""
    port = _free_port()
    argv = [sys.executable, *web_command("127.0.0.1", port)]
    process = subprocess.Popen(
        argv,
        env=subprocess_env(BERTH_TRUSTED_PROXIES="0"),
        cwd=BASE_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}healthz", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # answering (503: Redis or the database is named): it is up
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _failed_sign_in(url: str, forwarded_for: str) -> int:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
    with opener.open(f"{url}accounts/login/", timeout=10) as response:
        html = response.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    form = {"username": "alice", "password": "wrong-password-1", "csrfmiddlewaretoken": token}
    request = urllib.request.Request(
        f"{url}accounts/login/",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Referer": url, "X-Forwarded-For": forwarded_for},
    )
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def test_finding_07_berth_up_starts_uvicorn_without_proxy_headers() -> None:
    argv = web_command("127.0.0.1", 8000)
    assert "--no-proxy-headers" in argv
    assert "--proxy-headers" not in argv
    readme = (BASE_DIR / "README.md").read_text()
    production = [line for line in readme.splitlines() if "uvicorn config.asgi:application" in line]
    assert production, "the README's production command is gone"
    assert all("--no-proxy-headers" in line for line in production)


@pytest.mark.django_db(transaction=True)
def test_finding_07_forged_forwarded_for_neither_escapes_the_lockout_nor_reaches_the_audit(
    uvicorn_as_berth_up_starts_it: str, alice: User
) -> None:
    """From loopback, with no trusted proxy: uvicorn must not rewrite the client address from
    the header (it did, so 30 varying headers were never locked out)."""
    url = uvicorn_as_berth_up_starts_it
    statuses = [_failed_sign_in(url, f"10.9.{attempt}.1") for attempt in range(8)]
    assert 429 in statuses, statuses
    assert statuses.index(429) == settings.AXES_FAILURE_LIMIT - 1
    addresses = set(
        AuditEvent.objects.filter(action__startswith="auth.").values_list("client_ip", flat=True)
    )
    assert addresses == {"127.0.0.1"}


def test_finding_07_axes_uses_berths_own_client_address(alice: User, settings) -> None:
    """Axes reads the address through Berth's function: with one trusted proxy, the client
    the proxy saw is locked, not the proxy (the ``AXES_IPWARE_*`` settings need django-ipware,
    which is not installed, so they did nothing)."""
    assert settings.AXES_CLIENT_IP_CALLABLE == "core.middleware.client_ip_for"
    settings.BERTH_TRUSTED_PROXIES = 1
    request = RequestFactory().get(
        "/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="6.6.6.6, 192.0.2.44"
    )
    assert get_client_ip_address(request) == client_ip_for(request) == "192.0.2.44"
    proxy = Client(REMOTE_ADDR="10.0.0.1")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        proxy.post(
            "/accounts/login/",
            {"username": "alice", "password": "wrong-password-1"},
            HTTP_X_FORWARDED_FOR="192.0.2.44",
        )
    # The attacker behind the proxy is locked; alice from another client is not.
    other = proxy.post(
        "/accounts/login/",
        {"username": "alice", "password": PASSWORD},
        HTTP_X_FORWARDED_FOR="192.0.2.99",
    )
    assert other.status_code == 302


# --- 8. a live status stream after sign-out or team removal ---


def _in_own_loop(check: Any) -> None:
    """Run an async check in a fresh event loop on its own thread, closing the database
    connections its ORM calls opened there."""

    async def closing() -> None:
        try:
            await check
        finally:
            await sync_to_async(connections.close_all)()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, closing()).result(timeout=60)


async def _open_stream(user: User, deployment: Deployment) -> tuple[AsyncClient, Any]:
    client = AsyncClient()
    await sync_to_async(client.force_login)(user)
    response = await client.get(f"/deployments/{deployment.public_id}/stream/")
    chunks = response.streaming_content
    assert (await anext(chunks)).startswith(b"event: status\n")
    return client, chunks


async def _the_stream_ends(chunks: Any) -> bytes:
    """The next chunk (after the change that is published) and proof that nothing follows."""
    last = await asyncio.wait_for(anext(chunks), timeout=20)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(chunks), timeout=20)
    return last


def _deployment(team: Team, tmp_path: Path) -> Deployment:
    model = registered_model(team, tmp_path)
    host = host_with_gpus(count=1)
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    return Deployment.objects.create(
        name="tiny", team=team, model=model, host=host, image=image, gpu_count=1
    )


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("what", ["sign-out", "team-removal"])
def test_finding_08_the_stream_ends_at_sign_out_and_at_team_removal(
    alice: User, team_a: Team, tmp_path: Path, what: str
) -> None:
    deployment = _deployment(team_a, tmp_path)

    async def check() -> None:
        client, chunks = await _open_stream(alice, deployment)
        if what == "sign-out":
            await client.alogout()  # the session is gone from the store
        else:
            await Membership.objects.filter(user=alice, team=team_a).adelete()
        await Deployment.objects.filter(pk=deployment.pk).aupdate(state=State.QUEUED)
        await sync_to_async(publish)(deployment.pk)
        last = await _the_stream_ends(chunks)
        assert last.startswith(b"event: end\n"), last
        assert b"Queued" not in last

    _in_own_loop(check())


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_finding_08_a_stream_has_a_capped_lifetime(
    alice: User, team_a: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The browser's EventSource reconnects (``retry:``), and the new request is checked again."""
    monkeypatch.setattr(stream, "MAX_LIFETIME_S", 1.0)
    deployment = _deployment(team_a, tmp_path)

    async def check() -> None:
        started = time.monotonic()
        _client, chunks = await _open_stream(alice, deployment)
        last = await _the_stream_ends(chunks)
        assert last.startswith(b"retry: "), last
        assert time.monotonic() - started < 10

    _in_own_loop(check())
