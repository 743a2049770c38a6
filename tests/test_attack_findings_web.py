"""Findings 7 and 8 of the attack on a running console (issue 15): the client address behind
uvicorn, and a live status stream after sign-out or team removal."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar

import pytest
from axes.helpers import get_client_ip_address
from django.conf import settings
from django.test import Client, RequestFactory

from accounts.models import User
from audit.models import AuditEvent
from config.management.commands.berth_up import web_command
from core.middleware import client_ip_for
from tests.conftest import BASE_DIR, PASSWORD, subprocess_env

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
