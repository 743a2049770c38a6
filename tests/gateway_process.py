"""The real gateway and a vLLM-like upstream as child processes, for the gateway's tests.

``Upstream`` runs ``tests/upstream.py`` (not vLLM: see its docstring); ``GatewayProcess`` runs
``manage.py berth_gateway`` on this test's database and Redis. Both are argument lists with
this interpreter, stopped by their own pid.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accounts.models import Team
from deployments.models import Deployment
from deployments.runtime.diagnostics import diagnose
from deployments.runtime.launcher import fail
from deployments.states import State
from gpus.models import Host
from tests.conftest import BASE_DIR, subprocess_env
from tests.deployment_builders import deployment, registered_model

START_DEADLINE_S = 30
PATH_TO_READY = (State.QUEUED, State.LAUNCHING, State.LOADING, State.READY)
METRICS_TOKEN = "gateway-test-metrics-token-0123456789"
CUDA_OOM_LINE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total "
    "capacity of 79.19 GiB of which 1.12 GiB is free."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream:
    """``tests/upstream.py`` on a free port."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "tests" / "upstream.py"), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the upstream did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdout.close()


class GatewayProcess:
    """``manage.py berth_gateway`` on a free port, started and waited for."""

    def __init__(self, **env: str):
        self.port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        environment = subprocess_env(BERTH_METRICS_TOKEN=METRICS_TOKEN, **env)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(BASE_DIR / "manage.py"),
                "berth_gateway",
                "--port",
                str(self.port),
            ],
            env=environment,
            cwd=BASE_DIR,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.output()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        output = self.output()
        self.stop()
        raise RuntimeError(f"the gateway did not start: {output}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, key: str | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], bytes]:
        connection = self.connection(timeout)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def chat(self, key: str, model: str, **extra: Any) -> tuple[int, dict[str, str], bytes]:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
        return self.request("POST", "/v1/chat/completions", body, key)


@dataclass
class Served:
    """A deployment of a team answering on an upstream."""

    deployment: Deployment
    upstream: Upstream | None


def serve(
    team: Team, host: Host, root: Any, name: str, port: int | None, state: State
) -> Deployment:
    """A deployment of ``team`` named ``name`` walked through the lifecycle to ``state`` (each
    step a real transition, published like the launcher's), answering on ``port``."""
    model = registered_model(team, root, name=name)
    built = deployment(team, model, host, name=name)
    if port is not None:
        Deployment.objects.filter(pk=built.pk).update(host_port=port)
        built.host_port = port
    walk(built, state)
    return built


def serve_replicas(
    user: Any, team: Team, host: Host, root: Any, name: str, upstreams: list[Upstream]
) -> list[Deployment]:
    """A deployment of ``team`` with one replica per upstream, requested as people request it
    (``services.request_deployment(replicas=N)``, the stand-in image without GPUs on ``host``),
    each replica's row answering on its own upstream's port; the rows stay ``queued`` (walk
    each one on). Its launch jobs wait on the host's queue, which no worker serves here."""
    from deployments import services
    from deployments.models import EngineImage
    from deployments.validation import DeployRequest
    from tests.model_dirs import write_model

    write_model(Path(root) / team.slug / name)
    image, _ = EngineImage.objects.get_or_create(
        name="stand-in",
        defaults={
            "reference": "berth-test/engine:stand-in",
            "gpu_capable": False,
            "cpu_capable": True,
            "is_stand_in": True,
        },
    )
    request = DeployRequest(
        team=team,
        model=registered_model(team, root, name=name),
        host=host,
        image=image,
        name=name,
        gpu_count=0,
        replicas=len(upstreams),
    )
    rows = list(services.request_deployment(user, request).group())
    for row, upstream in zip(rows, upstreams, strict=True):
        Deployment.objects.filter(pk=row.pk).update(host_port=upstream.port)
        row.host_port = upstream.port
    return rows


def walk(built: Deployment, state: State) -> None:
    """Transition ``built`` along pending → queued → launching → loading → ready up to
    ``state`` (or to failed from where it is)."""
    if state == State.FAILED:
        findings = diagnose([CUDA_OOM_LINE], exit_code=1)
        fail(built, "the engine exited with code 1", [f.as_json() for f in findings])
        return
    current = State(built.state)
    if current == state:
        return
    start = PATH_TO_READY.index(current) + 1 if current in PATH_TO_READY else 0
    for step in PATH_TO_READY[start:]:
        built.transition(step, message=f"test: {step}")
        if step == state:
            return


class SeverableProxy:
    """A TCP forwarder to ``target`` that can be cut and restored: a database "down" for one
    process (the gateway) while the test itself still reaches it directly."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self.connections: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self.listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        for sock in self.connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.listener is not listener:  # cut meanwhile
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
