"""``manage.py berth_up``: the embedded console in one command (``make run`` calls it).

Ensures Redis (starting a local redis-server when REDIS_URL is unreachable and one is
installed), migrates, creates the first admin account, with ``--demo`` (``BERTH_DEMO=1``) runs
``berth_demo``, registers this machine as a GPU host on the first run, then runs an RQ worker
with the scheduler, this machine's GPU agent (``berth_agent``), the ASGI web server and the
gateway (``berth_gateway``) until Ctrl-C, which stops all of them — as does any of them exiting.
"""

from __future__ import annotations

import signal
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from accounts.models import User
from config import demo_engine
from config.env import env_secret, env_str
from config.management.commands.berth_demo import MEMBER as DEMO_MEMBER
from config.processes import (
    Supervisor,
    child_environment,
    local_redis_argv,
    parent_make_is_stopping,
    port_in_use,
    redis_reachable,
    stop_when_parent_dies,
    wait_until,
)
from core.queues import DEFAULT_QUEUE
from deployments.models import Deployment, EngineImage
from gpus.hosts import local_host_name, register_host
from gpus.models import Host

REDIS_START_DEADLINE_S = 15.0
WEB_START_DEADLINE_S = 60.0
HEALTH_TIMEOUT_S = 2.0


def web_command(bind: str, port: int) -> list[str]:
    """uvicorn's arguments (after the interpreter) as ``berth_up`` runs the web server.

    ``--no-proxy-headers``: uvicorn otherwise trusts ``X-Forwarded-For`` from loopback and
    rewrites the client address before Django sees it, so anyone on the machine (or a request
    relayed through it) could pick the address that sign-in throttling and the audit trail
    record. Berth reads the header itself, once, as ``BERTH_TRUSTED_PROXIES`` says
    (``core.middleware.client_ip_for``)."""
    return [
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--host",
        bind,
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        "--no-server-header",
        "--no-proxy-headers",
    ]


class Stop(Exception):
    """Raised from the signal handler to leave the supervision loop."""


class Command(BaseCommand):
    help = "Run the embedded console: Redis if needed, migrations, first admin, worker, web."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--bind", default=settings.BERTH_BIND, help="address to listen on (BERTH_BIND)"
        )
        parser.add_argument(
            "--port", type=int, default=settings.BERTH_PORT, help="port to listen on (BERTH_PORT)"
        )
        parser.add_argument(
            "--demo",
            action="store_true",
            default=settings.BERTH_DEMO,
            help="run manage.py berth_demo after migrating (BERTH_DEMO=1): stand-in engine "
            "(not vLLM), demo model, team and member",
        )

    def handle(self, *args: Any, bind: str, port: int, demo: bool, **options: Any) -> None:
        if port_in_use(bind, port):
            raise CommandError(
                f"port {port} on {bind} is in use (another Berth, or another server?). "
                f"Set BERTH_PORT to a free one, e.g. BERTH_PORT={_next_port(port)} make run, "
                "or stop what listens there.",
                returncode=2,
            )
        supervisor = Supervisor()
        previous = {
            sig: signal.signal(sig, self._raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            stop_when_parent_dies()
            self._run(supervisor, bind, port, demo)
        except Stop:
            self.stdout.write("Stopping Berth…")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            supervisor.stop_all(lambda line: self.stdout.write(f"  {line}"))
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if supervisor.failed is not None:
            raise CommandError(f"{supervisor.failed} exited unexpectedly; see its output above")
        self.stdout.write("Berth stopped.")

    def _raise_stop(self, signum: int, frame: Any) -> None:
        raise Stop

    def _run(self, supervisor: Supervisor, bind: str, port: int, demo: bool) -> None:
        base_dir = Path(settings.BASE_DIR)
        self._ensure_redis(supervisor, base_dir)
        call_command("migrate", interactive=False, verbosity=1)
        logins = [_admin_login()]
        if demo:
            # Before the agent starts: the demo registers this machine, whose agent then runs
            # the launches (they go to the host's queue, host:<name>).
            logins.append(_demo_login())
        env = child_environment()
        manage = str(base_dir / "manage.py")
        worker = supervisor.start(
            "worker",
            [sys.executable, manage, "berth_worker", DEFAULT_QUEUE, "--with-scheduler"],
            env=env,
            cwd=base_dir,
        )
        agent_host = self._local_gpu_host()
        agent = None
        if agent_host is not None:
            agent = supervisor.start(
                "agent",
                [sys.executable, manage, "berth_agent", "--host", agent_host],
                env=env,
                cwd=base_dir,
            )
        web = supervisor.start(
            "web", [sys.executable, *web_command(bind, port)], env=env, cwd=base_dir
        )
        gateway = supervisor.start(
            "gateway", [sys.executable, manage, "berth_gateway"], env=env, cwd=base_dir
        )
        url = _url(bind, port)
        gateway_url = _url(settings.BERTH_GATEWAY_BIND, settings.BERTH_GATEWAY_PORT)
        for child, address in ((web, url), (gateway, gateway_url)):
            if not wait_until(
                lambda address=address: _healthy(address),
                WEB_START_DEADLINE_S,
                abort=lambda: supervisor.first_exited() is not None,
            ):
                supervisor.failed = (supervisor.first_exited() or child).name
                return
        self.stdout.write(self.style.SUCCESS(f"Berth is up at {url}"))
        self.stdout.write(
            f"  web pid {web.process.pid}, worker pid {worker.process.pid} "
            f"(queue '{DEFAULT_QUEUE}', with scheduler)"
        )
        self.stdout.write(
            f"  gateway pid {gateway.process.pid}: the OpenAI-compatible API at {gateway_url}v1 "
            "(keys: manage.py create_api_key)"
        )
        if agent is not None:
            self.stdout.write(
                f"  agent pid {agent.process.pid} (GPU inventory of host '{agent_host}', "
                f"queue 'host:{agent_host}')"
            )
        if not demo and not _has_engine_images():
            self.stdout.write(
                "  No engine image is allow-listed yet. To try a first deployment without a GPU, "
                "run BERTH_DEMO=1 make run (or manage.py berth_demo): stand-in engine, not vLLM."
            )
        for login in logins:
            self.stdout.write(f"  {login}")
        self.stdout.write(
            f"  Another port: BERTH_PORT={_next_port(port)} make run (BERTH_BIND for the address)."
        )
        self.stdout.write("  Press Ctrl-C to stop.")
        self.stdout.flush()
        if demo:
            threading.Thread(target=self._announce_demo, name="demo-chat", daemon=True).start()
        wait_until(
            lambda: supervisor.first_exited() is not None or parent_make_is_stopping(),
            float("inf"),
        )
        if supervisor.first_exited() is None:
            raise Stop  # make was told to stop but waits for this process to end
        supervisor.failed = supervisor.first_exited().name

    def _announce_demo(self) -> None:
        """When the demo deployed its model on the real engine: wait for it to be ready, then
        send it a first chat completion and print the answer (random text: random weights)."""
        try:
            if not Deployment.objects.filter(name=demo_engine.DEPLOYMENT_NAME).exists():
                return
            deployment = demo_engine.wait_until_served()
            if deployment is None:
                self.stdout.write(
                    f"  The demo deployment '{demo_engine.DEPLOYMENT_NAME}' did not become ready; "
                    "its page says why."
                )
            else:
                self.stdout.write(demo_engine.first_chat(deployment))
            self.stdout.flush()
        except Exception as exc:  # a demo nicety must never take the console down
            self.stdout.write(f"  The demo's first chat completion failed: {exc}")
        finally:
            connection.close()

    def _local_gpu_host(self) -> str | None:
        """The host this machine's agent collects for: registered on the first run (no hosts
        yet); None when BERTH_LOCAL_AGENT is off or this machine is not a registered host."""
        if not settings.BERTH_LOCAL_AGENT:
            return None
        name = local_host_name()
        if not Host.objects.exists():
            register_host(name)
            self.stdout.write(f"Registered this machine as GPU host '{name}'.")
        return name if Host.objects.filter(name=name).exists() else None

    def _ensure_redis(self, supervisor: Supervisor, base_dir: Path) -> None:
        url = settings.REDIS_URL
        if redis_reachable(url):
            return
        try:
            argv = local_redis_argv(url, Path(settings.VAR_DIR) / "redis")
        except ValueError as exc:
            raise CommandError(
                f"Redis is not reachable at REDIS_URL={url} and Berth cannot start one ({exc}). "
                "Fix: install it (Debian/Ubuntu: sudo apt-get install redis-server), "
                "or run one in Docker (docker run -d -p 6379:6379 redis:7), "
                "or point REDIS_URL at a reachable server."
            ) from None
        redis = supervisor.start("redis", argv, env=child_environment(), cwd=base_dir)
        if not wait_until(
            lambda: redis_reachable(url), REDIS_START_DEADLINE_S, abort=lambda: not redis.running
        ):
            raise CommandError(
                f"started redis-server for {url} but it did not answer; "
                f"see {Path(settings.VAR_DIR) / 'redis' / 'redis.log'}"
            )
        self.stdout.write(
            f"Started redis-server for {url} (pid {redis.process.pid}, data in var/redis)."
        )


def _admin_login() -> str:
    """Create the first admin (``ensure_admin`` prints a generated password once); returns
    the closing banner's line saying where that password is."""
    username = env_str("BERTH_ADMIN_USERNAME", "admin")
    existed = User.objects.filter(username=username).exists()
    call_command("ensure_admin")
    if existed:
        return _signed_in_as(username, "set on an earlier run")
    if env_secret("BERTH_ADMIN_PASSWORD") is not None:
        return _signed_in_as(username, "from BERTH_ADMIN_PASSWORD")
    return _signed_in_as(username, "printed above under 'Created the first admin account'")


def _demo_login() -> str:
    """Run ``berth_demo``, which prints its member's generated password once."""
    existed = User.objects.filter(username=DEMO_MEMBER).exists()
    call_command("berth_demo")
    where = "set on an earlier run" if existed else "printed above under 'The demo is ready'"
    return _signed_in_as(DEMO_MEMBER, where)


def _signed_in_as(username: str, where: str) -> str:
    return (
        f"Sign in as {username}: password {where} "
        f"(lost it? .venv/bin/python manage.py changepassword {username})."
    )


def _next_port(port: int) -> int:
    return port + 1 if port < 65535 else 8001


def _has_engine_images() -> bool:
    return EngineImage.objects.exists()


def _url(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind else bind
    return f"http://{host}:{port}/"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}healthz", timeout=HEALTH_TIMEOUT_S) as response:  # noqa: S310 - our own http URL
            return response.status == 200
    except OSError:
        return False
