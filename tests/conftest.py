"""Shared fixtures: the people of every permission test, services, and helpers.

Tests that need a service (Redis, PostgreSQL, Docker, Chromium) are marked; when the service
is missing they skip with the reason, unless BERTH_REQUIRE_SERVICES=1 (CI), where they fail.
Tests marked ``postgres`` need the suite to run on PostgreSQL (DATABASE_URL=postgres://...);
on SQLite they are deselected and the summary says how many, so CI runs the suite once on each.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hypothesis
import pytest
from django.conf import settings
from django.db import connection
from redis import Redis
from redis.exceptions import RedisError

from accounts.models import Membership, Role, Team, User

# Property tests: no per-example deadline and no "too slow" health check — on a loaded 2-core CI
# machine the first draw of a regex strategy can take seconds, which says nothing about Berth.
hypothesis.settings.register_profile(
    "berth", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("berth")

REQUIRE_SERVICES = os.environ.get("BERTH_REQUIRE_SERVICES", "") == "1"
BASE_DIR = Path(__file__).resolve().parent.parent
PASSWORD = "correct-horse-battery-staple"
CHROMIUM = Path("/usr/bin/chromium")


def _test_redis_url(url: str) -> str:
    """A Redis database of its own for each xdist worker (15, 14, ... counting down from
    BERTH_TEST_REDIS_DB), flushed at start, so tests never touch the development data in
    database 0 and workers never share a queue. Two suites running side by side on one machine
    give each other room with BERTH_TEST_REDIS_DB (e.g. 11)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-1")
    top = int(os.environ.get("BERTH_TEST_REDIS_DB", "15"))
    index = max(top - (int(worker.removeprefix("gw")) + 1) % 8, 1)
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{index}"))


TEST_REDIS_URL = _test_redis_url(settings.REDIS_URL)
settings.REDIS_URL = TEST_REDIS_URL
settings.RQ_QUEUES["default"]["URL"] = TEST_REDIS_URL
# Containers and volumes of this test process are named and labelled apart from every other
# run (and from a console on the same engine): parallel workers reuse the same primary keys.
TEST_INSTANCE = "t" + uuid.uuid4().hex[:8]
settings.BERTH_INSTANCE = TEST_INSTANCE
# ...and publish engines on a port range of their own.
settings.BERTH_ENGINE_PORT_MIN = 20000 + uuid.uuid4().int % 120 * 100  # below ephemeral ports
settings.BERTH_ENGINE_PORT_MAX = settings.BERTH_ENGINE_PORT_MIN + 99


def run_coroutine[T](coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a fresh thread. The session's Playwright browser keeps its event loop
    running on the main thread of an xdist worker once a browser test has run there, and
    ``asyncio.run`` refuses to start inside a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def service_missing(reason: str) -> None:
    """Skip (locally) or fail (CI) a test whose service is not available."""
    if REQUIRE_SERVICES:
        pytest.fail(f"BERTH_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@cache
def _redis_problem() -> str | None:
    try:
        client = Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=1)
        client.ping()
        client.flushdb()
    except RedisError as exc:
        return f"Redis is not reachable at {TEST_REDIS_URL}: {exc}"
    return None


@cache
def _docker_problem() -> str | None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # docker raises several unrelated types when the engine is absent
        return f"no Docker engine reachable: {exc}"
    return None


@cache
def _browser_problem() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if connection.vendor == "postgresql":
        return
    kept = [item for item in items if item.get_closest_marker("postgres") is None]
    deselected = [item for item in items if item.get_closest_marker("postgres") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
        config._berth_pg_deselected = len(deselected)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    # Tables a test reports through record_property (travels from xdist workers with the report).
    for report in (r for reports in terminalreporter.stats.values() for r in reports):
        for name, value in getattr(report, "user_properties", ()):
            if name.endswith("_table") and getattr(report, "when", "call") == "call":
                terminalreporter.write_sep("-", name.replace("_", " "))
                terminalreporter.write_line(str(value))
    count = getattr(config, "_berth_pg_deselected", 0)
    if count:
        terminalreporter.write_line(
            f"{count} PostgreSQL tests deselected: the suite ran on SQLite; "
            "run it again with DATABASE_URL=postgres://... to include them"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    checks = {
        "redis": _redis_problem,
        "docker": _docker_problem,
        "vllm": _docker_problem,
        "browser": _browser_problem,
    }
    for marker, problem in checks.items():
        if item.get_closest_marker(marker) is not None and (reason := problem()) is not None:
            service_missing(reason)


@pytest.fixture(autouse=True)
def _fast_passwords(settings: Any) -> None:
    """MD5 hashing in tests: Django's PBKDF2 default costs ~0.5 s per login on two cores."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def team_a(db: None) -> Team:
    """Team A ("team-a"), alice's team."""
    return Team.objects.create(slug="team-a", name="Team A")


@pytest.fixture
def team_b(db: None) -> Team:
    """Team B ("team-b"), bob's team."""
    return Team.objects.create(slug="team-b", name="Team B")


def make_user(username: str, role: Role, *teams: Team) -> User:
    user = User.objects.create_user(username=username, password=PASSWORD, role=role)
    for team in teams:
        Membership.objects.create(user=user, team=team)
    return user


@pytest.fixture
def alice(team_a: Team) -> User:
    """A member of team A."""
    return make_user("alice", Role.MEMBER, team_a)


@pytest.fixture
def bob(team_b: Team) -> User:
    """A member of team B."""
    return make_user("bob", Role.MEMBER, team_b)


@pytest.fixture
def carol(db: None) -> User:
    """An auditor: reads the audit trail and nothing else."""
    return make_user("carol", Role.AUDITOR)


@pytest.fixture
def admin(db: None) -> User:
    """An admin: everything, including the Django admin and the RQ dashboard."""
    return make_user("root", Role.ADMIN)


@pytest.fixture
def people(alice: User, bob: User, carol: User, admin: User) -> dict[str, User | None]:
    """The permission-matrix cast by name; ``anonymous`` is None."""
    return {"alice": alice, "bob": bob, "carol": carol, "admin": admin, "anonymous": None}


ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


def clean_environ(*drop_prefixes: str) -> dict[str, str]:
    """This process's environment for a child, minus test-only switches and ``drop_prefixes``."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != ASYNC_UNSAFE and not key.startswith(drop_prefixes or ("\0",))
    }


def subprocess_env(**overrides: str) -> dict[str, str]:
    """Environment for a child ``manage.py`` that shares this test's database and Redis."""
    env = clean_environ()
    env["DATABASE_URL"] = database_url_of_test_db()
    env["REDIS_URL"] = TEST_REDIS_URL
    env["BERTH_INSTANCE"] = TEST_INSTANCE
    env["BERTH_ENGINE_PORT_MIN"] = str(settings.BERTH_ENGINE_PORT_MIN)
    env["BERTH_ENGINE_PORT_MAX"] = str(settings.BERTH_ENGINE_PORT_MAX)
    env["BERTH_VAR_DIR"] = str(settings.VAR_DIR)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def database_url_of_test_db() -> str:
    config = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(config['NAME']).resolve()}"
    auth = config["USER"] + (f":{config['PASSWORD']}" if config["PASSWORD"] else "")
    host, port = config["HOST"] or "localhost", config["PORT"] or 5432
    return f"postgres://{auth}@{host}:{port}/{config['NAME']}"


def run_manage(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``manage.py`` in a child process (exec-style, this interpreter)."""
    return subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), *args],
        env=env,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def redis_client() -> Iterator[Redis]:
    """A client on this worker's test Redis database."""
    client = Redis.from_url(TEST_REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def periodic_claims(redis_client: Redis) -> Iterator[Redis]:
    """No periodic job of this test process is claimed for its interval (before and after the
    test): each test starts as a console whose agents have just started."""

    def clear() -> None:
        keys = list(redis_client.scan_iter(f"berth:{TEST_INSTANCE}:periodic:*"))
        if keys:
            redis_client.delete(*keys)

    clear()
    yield redis_client
    clear()


def which_or_skip(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        service_missing(f"{binary} is not installed")
    return str(path)


BUSYBOX = Path("/usr/bin/busybox")
BUSYBOX_DOCKERFILE = b"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
CMD ["/bin/sh"]
"""


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A Docker SDK client on the local engine (skips or fails when there is none)."""
    if (reason := _docker_problem()) is not None:
        service_missing(reason)
    import docker

    client = docker.from_env(timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any) -> str:
    """A tiny local image ``FROM scratch`` with Debian's static busybox (no registry needed).

    Tagged by the content hash of its inputs, so it is built once per machine and reused.
    """
    if not BUSYBOX.exists():
        service_missing(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    return build_busybox_image(docker_client)


def build_busybox_image(client: Any) -> str:
    import hashlib

    from deployments.runtime.stand_in import build_from_files

    binary = BUSYBOX.read_bytes()
    tag = "berth-test/busybox:" + hashlib.sha256(BUSYBOX_DOCKERFILE + binary).hexdigest()[:12]
    if client.images.list(name=tag):
        return tag
    files = [("Dockerfile", BUSYBOX_DOCKERFILE, 0o644), ("busybox", binary, 0o755)]
    return build_from_files(client, tag, files)


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process (not in xdist workers), build the local test images once
    before the workers start: workers then never build concurrently, and a garbage-collection
    test pruning dangling images can never race a build."""
    if hasattr(config, "workerinput") or _docker_problem() is not None or not BUSYBOX.exists():
        return
    import docker
    from tests.engine_image import build_engine_image

    client = docker.from_env(timeout=120)
    try:
        build_busybox_image(client)
        build_engine_image(client)
    finally:
        client.close()


ARTIFACTS = BASE_DIR / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine has no outbound network
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never ``playwright install``)."""
    if (reason := _browser_problem()) is not None:
        service_missing(reason)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread, so Django would refuse
    # the plain ORM calls tests make between page actions. Child processes never inherit this
    # (see ``clean_environ``).
    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()
    if previous is None:
        os.environ.pop(ASYNC_UNSAFE, None)
    else:
        os.environ[ASYNC_UNSAFE] = previous


@pytest.fixture
def page(browser: Any, live_server: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser page on the live server. Console errors (CSP violations included) fail
    the test; a screenshot of the last state is kept in ``artifacts/`` when the test fails."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    new_page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield new_page
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        screenshot(new_page, f"failed-{request.node.name}")
    context.close()
    assert errors == [], f"browser console errors: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot under ``artifacts/screenshots/``."""
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def browser_login(page: Any, username: str, password: str = PASSWORD) -> None:
    """Sign in through the login form, as a person would."""
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


from tests.asgi_console import asgi_url, console_url, demo_console  # noqa: E402, F401
from tests.engine_image import engine_image  # noqa: E402, F401  (the stand-in vLLM image)
from tests.vllm_engine import vllm_image  # noqa: E402, F401  (the real CPU vLLM image)


@pytest.fixture
def no_nvidia_driver() -> None:
    """For tests of how Berth fails on a machine without NVIDIA's driver (like CI): they skip
    on a GPU host, where the real library loads."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return
    pynvml.nvmlShutdown()
    pytest.skip("this machine has an NVIDIA driver; the test checks the behaviour without one")
