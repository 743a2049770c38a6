"""Starting and stopping the processes of the embedded set-up (``manage.py berth_up``).

This is the one module that starts programs: each command is an argument list with an absolute
executable (``sys.executable`` or the resolved ``redis-server``), never a shell. Children run in
their own session so that Ctrl-C reaches only the supervisor, which then stops them in order
(web first, so no new work arrives; then the worker, warm; then Redis) and kills whatever
outlives its deadline. On Linux each child also gets SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import RedisError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
STOP_DEADLINE_S = 20.0
POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_when_parent_dies() -> None:
    """Ask Linux to send this process SIGTERM when its parent exits. ``make`` does not pass a
    signal on to its recipe: ``kill <make's pid>`` ends make alone and would leave the console
    running; with this, the console stops as it does on Ctrl-C. Elsewhere, a no-op."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


MAKE_NAMES = frozenset({"make", "gmake"})
FATAL_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def parent_make_is_stopping() -> bool:
    """True when this process's parent is GNU make handling a fatal signal. make passes SIGTERM
    on to its recipe, but on SIGINT it only waits for the recipe to end (a terminal's Ctrl-C
    reaches the whole process group), so ``kill -INT <make's pid>`` would wait forever. While
    make's handler runs, the kernel blocks the signal being handled: ``SigBlk`` in
    /proc/<pid>/status shows it. Linux only; elsewhere, False."""
    proc = Path("/proc") / str(os.getppid())
    try:
        if (proc / "comm").read_text().strip() not in MAKE_NAMES:
            return False
        status = (proc / "status").read_text()
    except OSError:
        return False
    blocked = next((line for line in status.splitlines() if line.startswith("SigBlk:")), "")
    mask = int(blocked.split()[1], 16) if blocked else 0
    return any(mask & (1 << (sig - 1)) for sig in FATAL_SIGNALS)


def port_in_use(bind: str, port: int) -> bool:
    """True when nothing could listen on ``bind:port`` now (another server holds it)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT is not reported as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError:
            return True
    return False


@dataclass
class Child:
    """A supervised process and how to stop it politely."""

    name: str
    process: subprocess.Popen
    stop_signal: int = signal.SIGTERM

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, deadline_s: float = STOP_DEADLINE_S) -> int | None:
        if self.running:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=deadline_s)
        return self.process.returncode


@dataclass
class Supervisor:
    """Children in start order; stopped in reverse order."""

    children: list[Child] = field(default_factory=list)
    failed: str | None = None  # the name of a child that exited while it should have run

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path,
        stdout: int | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        if not Path(argv[0]).is_absolute():
            raise ValueError(f"{name}: executable must be an absolute path, got {argv[0]!r}")
        process = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            start_new_session=True,
            stdout=stdout,
            preexec_fn=_die_with_parent,  # only calls prctl: safe between fork and exec
        )
        child = Child(name, process, stop_signal)
        self.children.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((child for child in self.children if not child.running), None)

    def stop_all(self, report: Callable[[str], None]) -> None:
        for child in reversed(self.children):
            code = child.stop()
            report(f"stopped {child.name} (exit {code})")


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except RedisError:
        return False


def local_redis_argv(url: str, data_dir: Path) -> list[str]:
    """The command that serves ``url`` from a local redis-server, or ValueError saying why not.

    Append-only persistence is on, so queued jobs survive a restart of the embedded Redis.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if parts.scheme != "redis" or host not in LOCAL_HOSTS:
        raise ValueError(f"REDIS_URL={url} is not a plain local redis:// address")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ValueError("redis-server is not installed")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        # Not resolved: redis-server is a symlink to a multi-call binary that reads argv[0].
        str(Path(binary).absolute()),
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(data_dir / "redis.log"),
    ]


def wait_until(
    predicate: Callable[[], bool], deadline_s: float, *, abort: Callable[[], bool] = lambda: False
) -> bool:
    """Poll ``predicate`` until it holds, ``abort`` holds, or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        if abort():
            return False
        time.sleep(POLL_S)
    return predicate()


def child_environment(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env
