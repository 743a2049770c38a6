"""The gateway's own cost: a vLLM-like upstream reached directly, through Berth's gateway and
through LiteLLM's proxy, side by side and alternating in one run on this machine.

The upstream is ``tests/upstream.py`` (not vLLM: it answers like vLLM's OpenAI server, 16 tokens
per completion, at almost no cost). Berth's gateway runs as ``manage.py berth_gateway`` with
everything on: a key with RPM and TPM limits, a team token budget, the usage stream and its
consumer. LiteLLM's proxy (PyPI ``litellm[proxy]``) is installed into a throw-away virtualenv
under ``var/bench/`` the first time, never into Berth's lock. Offline, LiteLLM runs in master-key
mode only (its virtual keys and spend tracking need a database and Prisma binaries fetched at
run time), so it does *less* work per request than Berth here.

Load is open-loop: requests are sent on a fixed schedule and each latency is counted from its
scheduled time, so a target that falls behind is charged for the queue. Measured:

* added latency (proxy minus direct) p50 and p99 at 50 and 200 requests/s (non-streamed);
* added time to first byte for streamed completions (at 50 requests/s);
* the highest rate (of a rising ladder) at which p99 stays under 100 ms with under 1% errors.

Goals: Berth's added p50 and p99 at most half of LiteLLM's, its top rate at least twice as high.
Client, upstream and proxies share this machine's cores, so absolute figures are the machine's::

    .venv/bin/python benchmarks/gateway.py [--quick] [--no-litellm] [--rounds 2] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BASE_DIR,
    emit_json,
    percentile,
    print_table,
    setup_django,
    target,
    throwaway_database,
)

LITELLM_VENV = BASE_DIR / "var" / "bench" / "litellm-venv"
LITELLM_SPEC = "litellm[proxy]"
LITELLM_KEY = "sk-berth-bench-master-key"
INSTALL_TIMEOUT_S = 600
START_DEADLINE_S = 90
REQUEST_TIMEOUT_S = 10.0
LADDER = (10, 25, 50, 100, 200, 300, 400, 500, 650, 800, 1000, 1250, 1500, 2000)
QUIET_MAX_S = 60.0  # a saturated proxy works off its backlog after the client gave up
MAX_IN_FLIGHT = 128  # connections the client opens to one target
P99_LIMIT_MS = 100.0
MAX_ERROR_RATE = 0.01
BODY = {"model": "llama", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello"}]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the targets")
    parser.add_argument("--seconds", type=float, default=6.0, help="per target, rate and round")
    parser.add_argument("--no-litellm", action="store_true", help="direct and Berth only")
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s, shorter ladder")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 4.0
    return args


# --- the three ways to the upstream ---------------------------------------------------------


def install_litellm() -> tuple[Path | None, str]:
    """LiteLLM's proxy in its own virtualenv (reused when present); (executable, version or the
    reason it is missing)."""
    executable = LITELLM_VENV / "bin" / "litellm"
    python = LITELLM_VENV / "bin" / "python"
    try:
        if not executable.exists():
            print(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (benchmark only) ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "venv", str(LITELLM_VENV)],
                check=True,
                timeout=120,
                capture_output=True,
            )
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    LITELLM_SPEC,
                ],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                capture_output=True,
            )
        version = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            check=True,
            timeout=60,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        return None, f"LiteLLM could not be installed: {exc} {detail[-500:]}".strip()
    return executable, version


def seed(upstream_port: int) -> str:
    """A team with a budget, its ready deployment on the upstream, and a limited key."""
    from accounts.keys import KeySettings, create_api_key
    from accounts.models import Team
    from deployments.models import Deployment
    from deployments.states import State
    from gpus.models import Host
    from tests.deployment_builders import deployment, registered_model

    team = Team.objects.create(slug="bench", name="Bench", monthly_token_budget=10**12)
    model = registered_model(team, BASE_DIR / "var" / "bench" / "models", "llama")
    made = deployment(team, model, Host.objects.create(name="bench-local"), name="llama")
    Deployment.objects.filter(pk=made.pk).update(host_port=upstream_port)
    for step in (State.QUEUED, State.LAUNCHING, State.LOADING, State.READY):
        made.transition(step)
    _, clear = create_api_key(team, KeySettings("bench", rpm=10**7, tpm=10**9))
    return clear


def litellm_config(path: Path, upstream_port: int) -> None:
    config = {
        "model_list": [
            {
                "model_name": "llama",
                "litellm_params": {
                    "model": "hosted_vllm/llama",
                    "api_key": "unused",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    path.write_text(json.dumps(config))  # JSON is YAML


# --- load ---------------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, url: str, key: str | None):
        self.name, self.url = name, url
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"


async def one(session: Any, target_: Target, body: bytes, stream: bool) -> tuple[float, float]:
    """(time to first body byte, total) in seconds, from sending; raises on a failure."""
    started = time.perf_counter()
    async with session.post(target_.url, data=body, headers=target_.headers) as response:
        first = None
        async for _chunk in response.content.iter_any():
            first = first or time.perf_counter()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        if not stream and first is None:
            raise RuntimeError("empty answer")
    end = time.perf_counter()
    return (first or end) - started, end - started


async def phase(session: Any, target_: Target, rate: float, seconds: float, stream: bool) -> dict:
    """Open-loop load at ``rate`` for ``seconds``: latencies (ms) from each scheduled start."""
    body = json.dumps({**BODY, "stream": stream}).encode()
    count = max(1, int(rate * seconds))
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.05

    async def scheduled(index: int) -> None:
        nonlocal errors
        due = start + index / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        lag = time.perf_counter() - due
        try:
            ttfb, total = await asyncio.wait_for(
                one(session, target_, body, stream), REQUEST_TIMEOUT_S
            )
        except Exception:
            errors += 1
            return
        latencies.append((lag + total) * 1000)
        ttfbs.append((lag + ttfb) * 1000)

    await asyncio.gather(*(scheduled(i) for i in range(count)))
    return {"latency_ms": latencies, "ttfb_ms": ttfbs, "errors": errors, "sent": count}


async def drive(targets: list[Target], args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    # One pool per target, capped: a proxy that falls behind holds at most MAX_IN_FLIGHT of
    # the client's requests, so the backlog it works off afterwards (LiteLLM keeps serving
    # requests whose client gave up) cannot spill into the next target's phase.
    sessions = {
        t.name: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, keepalive_timeout=3)
        )
        for t in targets
    }
    try:
        return await _drive(targets, args, sessions)
    finally:
        for session in sessions.values():
            await session.close()


async def _drive(targets: list[Target], args: argparse.Namespace, sessions: dict) -> dict:
    results: dict[str, Any] = {"fixed": {}, "ladder": {}}
    idle_ms = {}
    for target_ in targets:  # warm every pool and code path
        session = sessions[target_.name]
        await phase(session, target_, 20, 2, False)
        await phase(session, target_, 20, 1, True)
        idle_ms[target_.name] = await idle_latency(session, target_)
    results["idle_ms"] = idle_ms
    for round_ in range(args.rounds):
        order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
        for rate, stream in ((50, False), (200, False), (50, True)):
            for target_ in order:
                session = sessions[target_.name]
                measured = await phase(session, target_, rate, args.seconds, stream)
                await quiesce(session, target_, idle_ms[target_.name])
                slot = results["fixed"].setdefault(
                    f"{target_.name}:{rate}:{stream}",
                    {"latency_ms": [], "ttfb_ms": [], "errors": 0, "sent": 0},
                )
                for field in ("latency_ms", "ttfb_ms"):
                    slot[field] += measured[field]
                slot["errors"] += measured["errors"]
                slot["sent"] += measured["sent"]
    ladder = LADDER[:8] if args.quick else LADDER
    for target_ in targets[1:]:  # the direct path only sets the baseline
        results["ladder"][target_.name] = await climb(
            sessions[target_.name], target_, ladder, args.seconds, idle_ms[target_.name]
        )
    return results


async def idle_latency(session: Any, target_: Target) -> float:
    """The median of 20 requests one at a time (ms)."""
    body = json.dumps(BODY).encode()
    samples = [(await one(session, target_, body, False))[1] * 1000 for _ in range(20)]
    return sorted(samples)[10]


async def quiesce(session: Any, target_: Target, idle_ms: float) -> None:
    """Wait until the target answers about as fast as when idle: a proxy that fell behind is
    still working off requests the client gave up on, which would load the next phase."""
    body = json.dumps(BODY).encode()
    end = time.perf_counter() + QUIET_MAX_S
    while time.perf_counter() < end:
        try:
            took = (await asyncio.wait_for(one(session, target_, body, False), 5))[1] * 1000
        except Exception:
            took = float("inf")
        if took <= max(5.0, 3 * idle_ms):
            return
        await asyncio.sleep(0.5)


async def climb(
    session: Any, target_: Target, ladder: tuple[int, ...], seconds: float, idle_ms: float
) -> dict:
    """Rates in order until one fails (p99 >= 100 ms or >= 1% errors)."""
    steps, best = [], 0
    for rate in ladder:
        measured = await phase(session, target_, rate, min(seconds, 4.0), False)
        p99 = percentile(measured["latency_ms"], 99) if measured["latency_ms"] else float("inf")
        ok = p99 < P99_LIMIT_MS and measured["errors"] <= MAX_ERROR_RATE * measured["sent"]
        steps.append({"rate": rate, "p99_ms": round(p99, 2), "errors": measured["errors"]})
        if not ok:
            break
        best = rate
        await quiesce(session, target_, idle_ms)
    return {"top_rate": best, "steps": steps}


# --- running it ---------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    litellm, litellm_version = (None, "skipped (--no-litellm)")
    if not args.no_litellm:
        litellm, litellm_version = install_litellm()
        if litellm is None:
            print(f"!! {litellm_version}\n!! running direct and Berth only", flush=True)
    setup_django()
    os.environ["BERTH_INSTANCE"] = "gwbench"
    from django.conf import settings
    from django.db import connection

    from config.processes import Supervisor, child_environment, wait_until
    from tests.gateway_process import free_port

    settings.BERTH_INSTANCE = "gwbench"
    supervisor = Supervisor()
    with throwaway_database() as vendor:
        try:
            ports = {name: free_port() for name in ("upstream", "berth", "litellm")}
            env = child_environment(
                DATABASE_URL=f"sqlite:///{connection.settings_dict['NAME']}",
                REDIS_URL=settings.REDIS_URL,
                BERTH_INSTANCE="gwbench",
                LOG_LEVEL="warning",
            )
            supervisor.start(
                "upstream",
                [
                    sys.executable,
                    str(BASE_DIR / "tests" / "upstream.py"),
                    "--port",
                    str(ports["upstream"]),
                    "--tokens",
                    "16",
                ],
                env=env,
                cwd=BASE_DIR,
                stdout=subprocess.DEVNULL,
            )
            key = seed(ports["upstream"])
            supervisor.start(
                "berth",
                [
                    sys.executable,
                    str(BASE_DIR / "manage.py"),
                    "berth_gateway",
                    "--port",
                    str(ports["berth"]),
                ],
                env=env,
                cwd=BASE_DIR,
            )
            targets = [
                Target("direct", f"http://127.0.0.1:{ports['upstream']}/v1/chat/completions", None),
                Target("berth", f"http://127.0.0.1:{ports['berth']}/v1/chat/completions", key),
            ]
            if litellm is not None:
                config = BASE_DIR / "var" / "bench" / "litellm-config.yaml"
                litellm_config(config, ports["upstream"])
                # Not Berth's environment: LiteLLM reads DATABASE_URL and REDIS_URL too.
                lenv = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": os.environ.get("HOME", "/root"),
                    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    "LITELLM_LOG": "ERROR",
                    "LITELLM_TELEMETRY": "False",
                    "DISABLE_SCHEMA_UPDATE": "True",
                }
                supervisor.start(
                    "litellm",
                    [
                        str(litellm),
                        "--config",
                        str(config),
                        "--port",
                        str(ports["litellm"]),
                        "--num_workers",
                        "1",
                    ],
                    env=lenv,
                    cwd=config.parent,
                    stdout=subprocess.DEVNULL,
                )
                targets.append(
                    Target(
                        "litellm",
                        f"http://127.0.0.1:{ports['litellm']}/v1/chat/completions",
                        LITELLM_KEY,
                    )
                )
            for target_ in targets:
                if not wait_until(
                    lambda t=target_: _answers(t),
                    START_DEADLINE_S,
                    abort=lambda: supervisor.first_exited() is not None,
                ):
                    raise SystemExit(f"{target_.name} did not start")
            results = asyncio.run(drive(targets, args))
            usage_rows = _usage_requests(settings.REDIS_URL)
        finally:
            supervisor.stop_all(lambda _message: None)
    report(args, vendor, targets, results, litellm_version, usage_rows)


def _answers(target_: Target) -> bool:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - a local http:// URL of our own
        target_.url, data=json.dumps(BODY).encode(), headers=target_.headers
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _usage_requests(redis_url: str) -> int:
    """Requests the usage rows count once the stream is drained: Berth's usage was really on."""
    from redis import Redis

    from gateway.models import UsageMinute
    from gateway.usage import drain

    drain(Redis.from_url(redis_url), "gwbench", deadline_s=30)
    return sum(UsageMinute.objects.values_list("requests", flat=True))


def report(args, vendor, targets, results, litellm_version, usage_rows) -> None:  # type: ignore[no-untyped-def]
    fixed = results["fixed"]
    names = [t.name for t in targets]

    def stat(name: str, rate: int, stream: bool, field: str, q: float) -> float | None:
        values = fixed.get(f"{name}:{rate}:{stream}", {}).get(field) or []
        return round(percentile(values, q), 2) if values else None

    def added(name: str, rate: int, stream: bool, field: str, q: float) -> float | None:
        mine, base = stat(name, rate, stream, field, q), stat("direct", rate, stream, field, q)
        return None if mine is None or base is None else round(mine - base, 2)

    rows, figures = [], {}
    for name in names:
        figures[name] = {
            "p50_added_ms_50rps": added(name, 50, False, "latency_ms", 50),
            "p99_added_ms_50rps": added(name, 50, False, "latency_ms", 99),
            "p50_added_ms_200rps": added(name, 200, False, "latency_ms", 50),
            "p99_added_ms_200rps": added(name, 200, False, "latency_ms", 99),
            "ttfb_added_ms_stream_p50": added(name, 50, True, "ttfb_ms", 50),
            "ttfb_added_ms_stream_p99": added(name, 50, True, "ttfb_ms", 99),
            "p50_ms_200rps": stat(name, 200, False, "latency_ms", 50),
            "p99_ms_200rps": stat(name, 200, False, "latency_ms", 99),
            "errors": sum(v["errors"] for k, v in fixed.items() if k.startswith(name + ":")),
            "idle_ms": round(results["idle_ms"][name], 3),
            "top_rate_p99_under_100ms": results["ladder"].get(name, {}).get("top_rate"),
            "ladder": results["ladder"].get(name, {}).get("steps", []),
        }
        f = figures[name]
        rows.append(
            (
                name,
                f["p50_added_ms_50rps"],
                f["p99_added_ms_50rps"],
                f["p50_added_ms_200rps"],
                f["p99_added_ms_200rps"],
                f["ttfb_added_ms_stream_p50"],
                f["top_rate_p99_under_100ms"],
                f["errors"],
            )
        )
    print()
    print_table(
        [[("-" if v is None else v) for v in row] for row in rows],
        ("target", "+p50@50", "+p99@50", "+p50@200", "+p99@200", "+TTFB p50", "top rps", "errors"),
    )
    print(
        f"(added = minus direct, ms; LiteLLM {litellm_version}, master-key mode only: no "
        "virtual keys, no spend tracking — it does less work per request than Berth here)"
    )
    checks = [
        target("Berth usage rows counted every Berth request", usage_rows, "> 0", usage_rows > 0)
    ]
    if "litellm" in figures:
        b, lt = figures["berth"], figures["litellm"]
        for field in (
            "p50_added_ms_50rps",
            "p99_added_ms_50rps",
            "p50_added_ms_200rps",
            "p99_added_ms_200rps",
        ):
            ok = None if b[field] is None or lt[field] is None else b[field] <= lt[field] / 2
            checks.append(
                target(f"Berth {field} <= half LiteLLM's", b[field], f"<= {lt[field]} / 2", ok)
            )
        ok = b["top_rate_p99_under_100ms"] >= 2 * lt["top_rate_p99_under_100ms"]
        checks.append(
            target(
                "Berth top rate >= 2x LiteLLM's",
                b["top_rate_p99_under_100ms"],
                f">= 2 x {lt['top_rate_p99_under_100ms']}",
                ok,
            )
        )
    emit_json(
        "gateway",
        {
            "database": vendor,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "litellm": litellm_version,
            "litellm_mode": "master key only (offline)",
            "berth_usage_requests": usage_rows,
            "figures": figures,
            "targets": checks,
        },
    )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
