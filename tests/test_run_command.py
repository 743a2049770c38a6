"""``manage.py berth_up`` (what ``make run`` starts): the whole embedded console as one process
tree, and Ctrl-C stopping all of it."""

from __future__ import annotations

import http.cookiejar
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from audit.jobs import verify_chain
from tests.conftest import BASE_DIR, clean_environ, run_manage, which_or_skip

pytestmark = pytest.mark.redis

START_DEADLINE_S = 90
STOP_DEADLINE_S = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Console:
    """A running ``berth_up`` whose output is read line by line in the background."""

    def __init__(self, env: dict[str, str], argv: list[str] | None = None):
        self.process = subprocess.Popen(
            argv or [sys.executable, str(BASE_DIR / "manage.py"), "berth_up"],
            env=env,
            cwd=BASE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; output so far:\n{''.join(self.output)}")

    def close(self) -> None:
        """Kill it if it still runs; read to the end of its output, then close the pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.pump.join(timeout=10)
        self.process.stdout.close()

    def rest(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)


@pytest.fixture
def console_env(tmp_path: Path) -> dict[str, str]:
    env = clean_environ("DATABASE_URL", "SECRET_KEY", "BERTH_ADMIN_PASSWORD")
    env.update(
        BERTH_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'berth.sqlite3'}",
        BERTH_PORT=str(_free_port()),
        BERTH_GATEWAY_PORT=str(_free_port()),
        BERTH_ADMIN_USERNAME="platform-admin",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def console(console_env: dict[str, str]) -> Iterator[Console]:
    which_or_skip("redis-server")
    redis_port = _free_port()
    console_env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    running = Console(console_env)
    yield running
    running.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_berth_up_starts_redis_worker_and_web_and_ctrl_c_stops_them_all(
    console: Console, console_env: dict[str, str]
) -> None:
    redis_line = console.wait_for("Started redis-server for", START_DEADLINE_S)
    redis_pid = int(redis_line.split("(pid ")[1].split(",")[0])
    password_line = console.wait_for("password:", START_DEADLINE_S)
    assert "platform-admin" in "".join(console.output)
    assert len(password_line.split("password:")[1].strip()) >= 20
    url = console.wait_for("Berth is up at", START_DEADLINE_S).split("Berth is up at")[1].strip()
    pids_line = console.wait_for("web pid", 5)
    web_pid = int(pids_line.split("web pid ")[1].split(",")[0])
    worker_pid = int(pids_line.split("worker pid ")[1].split(" ")[0])
    gateway_line = console.wait_for("gateway pid", 5)
    gateway_pid = int(gateway_line.split("gateway pid ")[1].split(":")[0])
    gateway_url = f"http://127.0.0.1:{console_env['BERTH_GATEWAY_PORT']}/"
    with urllib.request.urlopen(f"{gateway_url}healthz", timeout=5) as response:
        assert json.load(response)["status"] == "ok"

    with urllib.request.urlopen(f"{url}healthz", timeout=5) as response:
        assert json.load(response) == {"status": "ok", "database": "ok", "redis": "ok"}
    password = password_line.split("password:")[1].strip()
    request_id = _sign_in_over_asgi(url, "platform-admin", password)

    # The worker it started runs jobs: the chain verification lands in the console's database.
    redis = Redis.from_url(console_env["REDIS_URL"])
    Queue("default", connection=redis).enqueue(verify_chain)
    database = Path(console_env["DATABASE_URL"].removeprefix("sqlite:///"))
    assert _wait(lambda: _count(database, "audit.verified") == 1, 30), console.rest()
    assert _count(database, "account.admin_created") == 1
    with sqlite3.connect(database, timeout=10) as db:
        login = db.execute(
            "SELECT actor_name, request_id FROM audit_auditevent WHERE action = 'auth.login'"
        ).fetchone()
    assert login == ("platform-admin", request_id)  # the request id survives the ASGI stack

    console.process.send_signal(signal.SIGINT)
    assert console.process.wait(timeout=STOP_DEADLINE_S) == 0, console.rest()
    output = console.rest()
    for line in ("stopped gateway", "stopped web", "stopped worker (exit 0)", "stopped redis"):
        assert line in output
    assert "Berth stopped." in output
    assert not any(_alive(pid) for pid in (web_pid, worker_pid, redis_pid, gateway_pid))


def test_a_second_start_keeps_the_admin_and_does_not_print_a_password(
    console_env: dict[str, str],
) -> None:
    console_env["REDIS_URL"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    first = run_manage("migrate", "-v0", env=console_env)
    assert first.returncode == 0, first.stderr
    created = run_manage("ensure_admin", env=console_env)
    again = run_manage("ensure_admin", env=console_env)
    assert "password:" in created.stdout
    assert "Admin account exists (platform-admin)." in again.stdout
    assert "password" not in again.stdout


def test_unreachable_remote_redis_gives_the_fix(console_env: dict[str, str]) -> None:
    console_env["REDIS_URL"] = "redis://redis.invalid:6379/0"
    result = run_manage("berth_up", env=console_env, timeout=60)
    assert result.returncode != 0
    message = result.stderr
    assert "Redis is not reachable at REDIS_URL=redis://redis.invalid:6379/0" in message
    assert "apt-get install redis-server" in message
    assert "docker run" in message


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _sign_in_over_asgi(url: str, username: str, password: str) -> str:
    """Sign in through the login form served by uvicorn; returns the POST's request id."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
    with opener.open(f"{url}accounts/login/", timeout=5) as response:
        html = response.read().decode()
    assert "Sign in to Berth" in html
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
    request = urllib.request.Request(
        f"{url}accounts/login/",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Referer": url},
    )
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(request, timeout=5)
    assert (redirect.value.code, redirect.value.headers["Location"]) == (302, "/")
    request_id = redirect.value.headers["X-Request-ID"]
    redirect.value.close()
    with opener.open(url, timeout=5) as response:
        assert "<h1>Dashboard</h1>" in response.read().decode()
    return request_id


def _count(database: Path, action: str) -> int:
    with sqlite3.connect(database, timeout=10) as db:
        return db.execute(
            "SELECT count(*) FROM audit_auditevent WHERE action = ?", [action]
        ).fetchone()[0]


def _wait(predicate, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()
